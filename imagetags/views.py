"""Views of the upload widget: the suggestions JSON endpoint and a ready upload page.

Both are thin: the form (``imagetags.forms``) and the services do the work. The JSON view is
plain Django on purpose, so the widget works on sites without Django REST Framework (the DRF
API lives in ``imagetags.api``).
"""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.contrib.auth.views import redirect_to_login
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.utils.decorators import method_decorator
from django.views import View
from django.views.decorators.csrf import csrf_protect
from django.views.decorators.http import require_POST

from imagetags.conf import imagetags_settings
from imagetags.forms import PostUploadForm, unavailable_message
from imagetags.services.pending_uploads import PendingUploadError
from imagetags.services.shown import sign_shown
from imagetags.services.suggest import NoActiveClusters, SuggestionUnavailable
from imagetags.services.suggestion_requests import (
    IMAGE_FIELD,
    InvalidRequest,
    parse_suggestion_request,
    suggest_for_request,
)
from imagetags.uploads import upload_guards


def _error(status: int, code: str, message: str, **extra: Any) -> JsonResponse:
    return JsonResponse({"error": message, "code": code, **extra}, status=status)


_REFUSAL_CODES = {413: "too_large", 429: "throttled"}


def _json_refusal(
    request: HttpRequest, status: int, message: str, headers: dict[str, str]
) -> JsonResponse:
    response = _error(status, _REFUSAL_CODES[status], message)
    for name, value in headers.items():
        response[name] = value
    return response


def _page_refusal(
    request: HttpRequest, status: int, message: str, headers: dict[str, str]
) -> HttpResponse:
    response = render(request, "imagetags/refused.html", {"message": message}, status=status)
    for name, value in headers.items():
        response[name] = value
    return response


# The guards (throttle, streaming size limit) wrap the views' CSRF check: see upload_guards.
@upload_guards(_json_refusal)
@require_POST
@csrf_protect
def suggestions(request: HttpRequest) -> JsonResponse:
    """Suggested tags for one or more images, merged: ``POST`` multipart ``image`` (repeatable),
    optional ``limit``, ``threshold``, ``exclude`` (tags as typed, e.g. the ones already chosen)
    and ``suggestions_token`` (the previous answer's, to merge). The fields are those of the
    REST API's ``suggestions`` endpoint, checked by the same validator
    (``services.suggestion_requests``), with the same limits and messages.

    200 ``{"tags": [{"name", "score", "evidence", ...}], "cluster_set", "clusters", "extractor",
    "method", "suggestions_token"}`` (``method``: the one that ranked these tags; the signed
    record of what was shown, see ``services.shown``, holds the same);
    errors are ``{"error": "<a sentence>", "code": "..."}`` with 400 (no or invalid image, too
    many files, a bad field: then also ``"errors": {"field": ["message", ...]}``, the API's 400
    body), 403 (not logged in, or no CSRF token), 413 (file too large) and 409 (no clusters
    yet, or clusters of another extractor). The 409 comes before a file is decoded: without
    clusters nothing can be suggested, so no time is spent opening images.
    """
    if imagetags_settings.LOGIN_REQUIRED and not request.user.is_authenticated:
        return _error(403, "login_required", "Log in to get tag suggestions.")
    # Text sent in the file field counts too, so that it is refused as the API refuses it.
    files = [*request.FILES.getlist(IMAGE_FIELD), *request.POST.getlist(IMAGE_FIELD)]
    try:
        params = parse_suggestion_request(request.POST, files)
        merged = suggest_for_request(params)
    except InvalidRequest as exc:
        return _error(400, exc.code, exc.message, errors=exc.errors)
    except SuggestionUnavailable as exc:
        code = "no_clusters" if isinstance(exc, NoActiveClusters) else "unavailable"
        return _error(409, code, unavailable_message(exc), detail=str(exc))
    # The signed record of what was shown (and by which set and method) travels with the
    # suggestions, in the widget's state, into the feedback records; the page's previous token
    # is merged in, so the latest one covers the chips kept from earlier answers.
    method = merged.method or ""
    token = sign_shown(
        merged.tags,
        cluster_set_id=merged.cluster_set,
        method=method,
        user=request.user,
        previous=params.previous_token,
    )
    return JsonResponse({**merged.as_dict(), "method": method, "suggestions_token": token})


@method_decorator(upload_guards(_page_refusal), name="dispatch")
@method_decorator(csrf_protect, name="dispatch")
class PostUploadView(View):
    """The upload page: :class:`~imagetags.forms.PostUploadForm` with the suggestion widget.

    With JavaScript it saves in one step; without, ``step=suggest`` shows the suggestions as
    checkboxes first (the files are kept meanwhile, see ``imagetags.forms``). Sites reuse it
    with their own template: ``PostUploadView.as_view(template_name=..., success_url=...)``.
    """

    template_name = "imagetags/upload.html"
    form_class = PostUploadForm
    success_url: str | None = None

    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if imagetags_settings.LOGIN_REQUIRED and not request.user.is_authenticated:
            return redirect_to_login(request.get_full_path())
        return super().dispatch(request, *args, **kwargs)

    def get_form_kwargs(self) -> dict[str, Any]:
        """What the form is built with: the user, and the session that binds an anonymous
        visitor's kept images to them."""
        return {"user": self.request.user, "session": getattr(self.request, "session", None)}

    def get(self, request: HttpRequest) -> HttpResponse:
        return self.render(self.form_class(**self.get_form_kwargs()))

    def post(self, request: HttpRequest) -> HttpResponse:
        form = self.form_class(request.POST, request.FILES, **self.get_form_kwargs())
        if not form.is_valid():
            form.keep_valid_images()
            return self.render(form, status=400)
        if form.wants_suggestions:
            return self.render(form.suggestion_step())
        try:
            post = form.save()
        except PendingUploadError as exc:  # the same token was saved by another submission
            form.add_error("images", str(exc))
            form.pending_upload = None  # back to the first step: the kept images are gone
            return self.render(form, status=400)
        count = post.post_tags.count()
        messages.success(
            request,
            f"Saved “{post}” with {count} tag{'' if count == 1 else 's'}.",
            fail_silently=True,
        )
        return redirect(request.path if self.success_url is None else str(self.success_url))

    def get_context_data(self, form: PostUploadForm) -> dict[str, Any]:
        """The template's context; sites add their own by overriding this."""
        return {"form": form, "second_step": form.pending_upload is not None}

    def render(self, form: PostUploadForm, status: int = 200) -> HttpResponse:
        return render(self.request, self.template_name, self.get_context_data(form), status=status)
