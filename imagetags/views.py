"""Views of the upload widget: the suggestions JSON endpoint and a ready upload page.

Both are thin: the form (``imagetags.forms``) and the services do the work. The JSON view is
plain Django on purpose, so the widget works on sites without Django REST Framework (the DRF
API lives in ``imagetags.api``).
"""

from __future__ import annotations

from collections.abc import Iterator
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
from imagetags.forms import (
    PostUploadForm,
    human_size,
    suggestion_method,
    unavailable_message,
)
from imagetags.images import InvalidImage
from imagetags.services.pending_uploads import PendingUploadError
from imagetags.services.shown import sign_shown
from imagetags.services.suggest import NoActiveClusters, SuggestionUnavailable, suggest_many
from imagetags.services.tagging import parse_tag_input
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
    optional ``limit``, ``exclude`` (tags as typed, e.g. the ones already chosen) and
    ``suggestions_token`` (the previous answer's, to merge).

    200 ``{"tags": [{"name", "score", "evidence", ...}], "cluster_set", "clusters", "extractor",
    "method", "suggestions_token"}`` (the signed record of what was shown, see
    ``services.shown``);
    errors are ``{"error": "<a sentence>", "code": "..."}`` with 400 (no or invalid image, too
    many files, bad limit), 403 (not logged in, or no CSRF token), 413 (file too large) and 409
    (no clusters yet, or clusters of another extractor). The 409 comes before a file is decoded:
    without clusters nothing can be suggested, so no time is spent opening images.
    """
    if imagetags_settings.LOGIN_REQUIRED and not request.user.is_authenticated:
        return _error(403, "login_required", "Log in to get tag suggestions.")
    files = request.FILES.getlist("image")
    if not files:
        return _error(400, "no_image", "Send at least one image in the field “image”.")
    max_files = imagetags_settings.MAX_FILES_PER_POST
    if len(files) > max_files:
        return _error(
            400, "too_many_files", f"At most {max_files} images at a time; {len(files)} were sent."
        )
    max_bytes = imagetags_settings.MAX_UPLOAD_BYTES
    for upload in files:
        # Checked from the size Django already knows, before any byte is decoded.
        if upload.size > max_bytes:
            return _error(
                413,
                "too_large",
                f"{upload.name} is {human_size(upload.size)}; "
                f"the limit is {human_size(max_bytes)} per image.",
            )
    limit_text = request.POST.get("limit", "")
    limit = None
    if limit_text:
        top = imagetags_settings.SUGGEST_LIMIT
        if not limit_text.isdigit() or not 1 <= int(limit_text) <= max(top, 1):
            return _error(400, "bad_limit", f"“limit” must be a whole number from 1 to {top}.")
        limit = int(limit_text)
    exclude = parse_tag_input(request.POST.get("exclude", ""))

    current: list[str] = []

    def each_file() -> Iterator[Any]:
        # suggest_many handles the files one after another; remembering which one is being
        # handled lets an InvalidImage error name the file at fault.
        for upload in files:
            current[:] = [upload.name]
            yield upload

    try:
        merged = suggest_many(each_file(), limit=limit, exclude=exclude)
    except InvalidImage as exc:
        name = current[0] if current else "the file"
        return _error(400, "invalid_image", f"{name}: {exc}")
    except SuggestionUnavailable as exc:
        code = "no_clusters" if isinstance(exc, NoActiveClusters) else "unavailable"
        return _error(409, code, unavailable_message(exc), detail=str(exc))
    # The signed record of what was shown (and by which set and method) travels with the
    # suggestions, in the widget's state, into the feedback records; the page's previous token
    # is merged in, so the latest one covers the chips kept from earlier answers.
    method = suggestion_method(merged)
    token = sign_shown(
        merged.tags,
        cluster_set_id=merged.cluster_set,
        method=method,
        user=request.user,
        previous=request.POST.get("suggestions_token", ""),
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
