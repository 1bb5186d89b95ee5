"""Upload form and the tag field with suggestions.

- :class:`SuggestedTagsField` (widget :class:`~imagetags.widgets.TagSuggestionWidget`) can go on
  any form or ModelForm: typed tags are parsed like django-taggit's ``TagField`` (commas and
  quoted names), and the cleaned value (:class:`TagSelection`, a list of names) also says which
  of them were accepted suggestions and which suggestions were shown, for ``create_post`` and its
  feedback records.
- :class:`PostUploadForm` is the ready upload form (one or more images, a title, tags).

Without JavaScript the upload form works in two steps: *upload → suggestions as checkboxes →
save*. Between the steps the files are kept by
:class:`~imagetags.services.pending_uploads.PendingUpload` (that module says how and why).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from django import forms
from django.db import transaction
from django.utils.translation import gettext_lazy as _

from imagetags.conf import imagetags_settings
from imagetags.images import InvalidImage
from imagetags.models import (
    FeedbackChannel,
    Post,
    normalize_tag_name,
)
from imagetags.services.pending_uploads import PendingUpload, PendingUploadError
from imagetags.services.posts import create_post, validate_uploads
from imagetags.services.shown import (
    InvalidSuggestionsToken,
    ShownRecord,
    ShownSuggestion,
    read_token,
    sign_shown,
)
from imagetags.services.suggest import (
    MergedSuggestions,
    NoActiveClusters,
    SuggestedTag,
    SuggestionUnavailable,
    suggest_many,
)
from imagetags.services.tagging import (
    InvalidTagName,
    clean_tag_name,
    parse_tag_input,
    too_many_tags_message,
)
from imagetags.widgets import TagSuggestionWidget

__all__ = [
    "MultipleImageField",
    "PostUploadForm",
    "SuggestedTagsField",
    "TagSelection",
    "human_size",
    "suggestion_method",
    "unavailable_message",
]


def suggestion_method(merged: MergedSuggestions) -> str:
    """The method that ranked merged suggestions, for feedback records."""
    return merged.per_image[0].method if merged.per_image else ""


def unavailable_message(exc: SuggestionUnavailable) -> str:
    """What a person uploading is told when no suggestions can be made (the exception's own
    message, with its `manage.py` advice, is for the site's staff)."""
    if isinstance(exc, NoActiveClusters):
        return str(_("No suggestions yet: this site's image library has not been clustered."))
    return str(_("Suggestions are unavailable until the site's image library is clustered again."))


def human_size(size: int) -> str:
    """A byte count as a person reads it: 20 MB, 60 KB, 500 bytes (the script says the same)."""
    if size >= 2**20:
        return f"{size / 2**20:.1f}".removesuffix(".0") + " MB"
    if size >= 2**10:
        return f"{size / 2**10:.0f} KB"
    return f"{size} bytes"


class TagSelection(list[str]):
    """The cleaned value of :class:`SuggestedTagsField`: the tag names, in order.

    It is a plain list of names for code that only wants the tags, and it also carries
    ``accepted`` (the names that came from suggestions), ``shown`` (every suggestion shown, in
    rank order, for feedback), ``cluster_set_id`` and ``method`` (what answered), ``channel``
    (``widget`` or ``form``) and ``token``, the signed record of what was shown
    (``services.shown``). Read from a request, ``shown``, ``cluster_set_id`` and ``method`` come
    from a valid token only (see :func:`parse_widget_state`).
    """

    def __init__(
        self,
        names: Iterable[str] = (),
        *,
        accepted: Iterable[str] = (),
        shown: Iterable[ShownSuggestion] = (),
        cluster_set_id: int | None = None,
        method: str = "",
        channel: str = FeedbackChannel.FORM,
        token: str = "",
    ) -> None:
        super().__init__(names)
        self.accepted = list(accepted)
        self.shown = list(shown)
        self.cluster_set_id = cluster_set_id
        self.method = method
        self.channel = channel
        self.token = token

    @property
    def shown_record(self) -> ShownRecord:
        """What ``create_post`` records feedback from."""
        return ShownRecord(tuple(self.shown), self.cluster_set_id, self.method, self.token)

    @property
    def typed(self) -> list[str]:
        """Names the person typed (or ticked without them being suggestions)."""
        accepted = set(self.accepted)
        return [name for name in self if name not in accepted]

    def state(self) -> dict[str, Any]:
        """The JSON-ready form of what the widget keeps in its hidden input."""
        return {
            "channel": self.channel,
            "cluster_set": self.cluster_set_id,
            "method": self.method,
            "shown": [
                {"name": item.name, "score": item.score, "rank": item.rank} for item in self.shown
            ],
            "accepted": list(self.accepted),
            "token": self.token,
        }


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def parse_widget_state(raw: str, user: Any = None) -> TagSelection:
    """Read the widget's hidden JSON (suggestions token, shown names, accepted names, channel).

    The value comes from the client. What was shown, the cluster set and the method are taken
    from its ``token`` (``services.shown``), checked for ``user``: the client's own ``shown``
    list can only narrow the token's items, never add to them, and without a valid token
    nothing counts as shown. Anything malformed is dropped rather than turned into an error:
    it only feeds feedback records and must not block saving the person's post.
    """
    try:
        data = json.loads(raw) if raw else {}
    except ValueError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    token = data.get("token")
    try:
        record = read_token(token, user) if isinstance(token, str) and token else None
    except InvalidSuggestionsToken:
        record = None
    channel = data.get("channel")
    channel = channel if channel in FeedbackChannel.values else FeedbackChannel.FORM
    if record is None:
        return TagSelection(channel=channel)
    if "shown" in data:
        claimed = [
            item["name"]
            for item in _list(data["shown"])
            if isinstance(item, dict) and isinstance(item.get("name"), str)
        ]
        record = record.narrowed(claimed)
    accepted = [
        normalize_tag_name(name) for name in _list(data.get("accepted")) if isinstance(name, str)
    ]
    return TagSelection(
        accepted=accepted,
        shown=record.items,
        cluster_set_id=record.cluster_set_id,
        method=record.method,
        channel=channel,
        token=token,
    )


class SuggestedTagsField(forms.Field):
    """Tags typed as text (``salmon, "cuba libre", rice``) or taken from suggestions.

    The widget sends three things: the text, the suggestions ticked on the no-JavaScript page,
    and a hidden JSON state written by the chips' script. The cleaned value is a
    :class:`TagSelection`: every name (typed and ticked), with ``accepted`` limited to names that
    really were shown as suggestions and are still in the tags.
    """

    widget = TagSuggestionWidget

    def __init__(
        self,
        *,
        images_field: str | None = None,
        suggest_url: str | None = None,
        max_tags: int | None = None,
        **kwargs: Any,
    ) -> None:
        """``images_field``: name of the file input whose images get suggestions (default
        ``images``); ``suggest_url``: the JSON view (default ``imagetags:suggestions``);
        ``max_tags``: the most names (default: the ``MAX_TAGS_PER_POST`` setting, read when the
        field cleans a value). ``field.user`` is whom suggestions tokens are checked for
        (``PostUploadForm`` sets it); without it only anonymous users' tokens count."""
        kwargs.setdefault(
            "help_text",
            _('Separate tags with commas; put a name with a comma in "double quotes".'),
        )
        super().__init__(**kwargs)
        self.max_tags = max_tags
        self.user: Any = None
        if images_field is not None:
            self.widget.images_field = images_field
        if suggest_url is not None:
            self.widget.suggest_url = suggest_url

    def to_python(self, value: Any) -> TagSelection:
        if isinstance(value, TagSelection):
            return value
        if isinstance(value, dict):
            text, ticked = value.get("text") or "", value.get("ticked") or []
            selection = parse_widget_state(value.get("state") or "", self.user)
        elif isinstance(value, list | tuple):
            text, ticked, selection = "", list(value), TagSelection()
        else:
            text, ticked, selection = str(value or ""), [], TagSelection()
        names = list(dict.fromkeys(parse_tag_input(text) + [normalize_tag_name(t) for t in ticked]))
        errors = []
        for name in names:
            try:
                clean_tag_name(name)
            except InvalidTagName as exc:
                errors.append(forms.ValidationError(str(exc), code="invalid_tag"))
        if errors:
            raise forms.ValidationError(errors)
        limit = imagetags_settings.MAX_TAGS_PER_POST if self.max_tags is None else self.max_tags
        if len(names) > limit:
            raise forms.ValidationError(too_many_tags_message(len(names), limit), code="too_many")
        shown_names = {item.name for item in selection.shown}
        # Ticked boxes are accepted suggestions too; anything not shown is simply a typed tag.
        candidates = selection.accepted + [normalize_tag_name(t) for t in ticked]
        accepted = [n for n in dict.fromkeys(candidates) if n in shown_names and n in names]
        return TagSelection(
            names,
            accepted=accepted,
            shown=selection.shown,
            cluster_set_id=selection.cluster_set_id,
            method=selection.method,
            channel=selection.channel,
            token=selection.token,
        )

    def prepare_value(self, value: Any) -> Any:
        return value

    def has_changed(self, initial: Any, data: Any) -> bool:
        try:
            return list(self.to_python(initial)) != list(self.to_python(data))
        except forms.ValidationError:
            return True


class MultipleImageInput(forms.ClearableFileInput):
    allow_multiple_selected = True


class MultipleImageField(forms.FileField):
    """One or more image files, each checked with the site's upload rules (``open_image``)."""

    widget = MultipleImageInput

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("widget", MultipleImageInput(attrs={"accept": "image/*"}))
        super().__init__(**kwargs)

    def clean(self, data: Any, initial: Any = None) -> list[Any]:
        uploads = [item for item in (data if isinstance(data, list | tuple) else [data]) if item]
        if not uploads:
            if self.required:
                raise forms.ValidationError(_("Choose at least one image."), code="required")
            return []
        cleaned = [super(MultipleImageField, self).clean(item, initial) for item in uploads]
        try:
            validate_uploads(cleaned)
        except InvalidImage as exc:
            raise forms.ValidationError(str(exc), code="invalid_image") from None
        return cleaned


class PostUploadForm(forms.Form):
    """One or more images, a title and tags; :meth:`save` creates the post via ``create_post``.

    Submitted with ``step=suggest`` (the no-JavaScript button), :meth:`suggestion_step` keeps
    the files and returns the second-step form listing suggestions as checkboxes. With the
    widget's script the chips do that work in the page and the form is saved in one step.
    """

    images = MultipleImageField(label=_("Images"), required=False)
    title = forms.CharField(label=_("Title"), max_length=200, required=False)
    tags = SuggestedTagsField(label=_("Tags"), required=False)
    pending = forms.CharField(widget=forms.HiddenInput, required=False)

    def __init__(self, *args: Any, user: Any = None, session: Any = None, **kwargs: Any) -> None:
        # ``session`` (the request's) binds an anonymous visitor's kept images to them; a form
        # built without it keeps them bound to nobody, as before.
        super().__init__(*args, **kwargs)
        self.user = user
        self.session = session
        self.fields["tags"].user = user
        self.pending_upload: PendingUpload | None = None
        self.suggestion_notice = ""
        self._pending_error = ""
        limit = imagetags_settings.MAX_FILES_PER_POST
        self.fields["images"].help_text = _(
            "JPEG, PNG, GIF or WebP; up to %(count)s images of at most %(size)s each."
        ) % {"count": limit, "size": human_size(imagetags_settings.MAX_UPLOAD_BYTES)}
        if self.is_bound and self.data.get(self.add_prefix("pending")):
            try:
                self.pending_upload = PendingUpload.load(
                    self.data[self.add_prefix("pending")], user, session
                )
            except PendingUploadError as exc:
                self._pending_error = str(exc)

    @property
    def wants_suggestions(self) -> bool:
        """The no-JavaScript first step: keep the files and show suggestions before saving."""
        return self.data.get("step") == "suggest"

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        if "images" in self.errors:
            return cleaned
        if not cleaned.get("images") and self.pending_upload is None:
            self.add_error("images", self._pending_error or _("Choose at least one image."))
        return cleaned

    def keep_valid_images(self) -> None:
        """After a failed submission whose images were fine, keep them so the page can be
        submitted again without choosing them again."""
        uploads = self.cleaned_data.get("images") if hasattr(self, "cleaned_data") else None
        if "images" in self.errors or not uploads:
            return
        self._keep(uploads)
        self.data = self.data.copy()
        self.data[self.add_prefix("pending")] = self.pending_upload.token

    def _keep(self, uploads: Sequence[Any]) -> PendingUpload:
        previous = self.pending_upload
        self.pending_upload = PendingUpload.store(uploads, self.user, self.session)
        if previous is not None:  # the person chose new images to replace the kept ones
            previous.discard()
        return self.pending_upload

    def suggestion_step(self) -> PostUploadForm:
        """Keep the files, suggest tags for them, and return the second step's form."""
        uploads = self.cleaned_data.get("images") or []
        pending = self._keep(uploads) if uploads else self.pending_upload
        tags: TagSelection = self.cleaned_data["tags"]
        suggested: list[SuggestedTag] = []
        cluster_set_id, method = None, ""
        notice = ""
        files = self._files_to_save()
        try:
            merged = suggest_many(files)
            suggested, cluster_set_id = merged.tags, merged.cluster_set
            method = suggestion_method(merged)
        except SuggestionUnavailable as exc:
            notice = unavailable_message(exc)
        except InvalidImage as exc:  # validated already; a file changed under us
            notice = str(exc)
        finally:
            for item in files:
                item.close()
        if not suggested and not notice:
            notice = str(_("No suggestions for these images: type the tags yourself."))
        shown = [ShownSuggestion(t.name, t.score, rank) for rank, t in enumerate(suggested, 1)]
        token = (
            sign_shown(suggested, cluster_set_id=cluster_set_id, method=method, user=self.user)
            if suggested
            else ""
        )
        selection = TagSelection(
            tags,
            accepted=[],
            shown=shown,
            cluster_set_id=cluster_set_id,
            method=method,
            channel=FeedbackChannel.FORM,
            token=token,
        )
        form = type(self)(
            initial={
                "pending": pending.token,
                "title": self.cleaned_data.get("title", ""),
                "tags": selection,
            },
            user=self.user,
            session=self.session,
            prefix=self.prefix,
        )
        form.pending_upload = pending
        form.suggestion_notice = notice
        form.fields["tags"].widget.suggestions = suggested
        return form

    def save(self) -> Post:
        """Create the post (all or nothing) and drop the kept files it was made from.

        Raises :class:`PendingUploadError` when the kept files were claimed by another
        submission of the same token (a double click): a token makes at most one post.
        """
        tags: TagSelection = self.cleaned_data["tags"]
        uses_kept = not self.cleaned_data.get("images") and self.pending_upload is not None
        with transaction.atomic():
            if uses_kept:
                # The transaction's first write, so that on SQLite a second submission waits
                # for this one's commit instead of deadlocking with it, and then is refused.
                self.pending_upload.claim()
            files = self._files_to_save()
            try:
                post = create_post(
                    files=files,
                    title=self.cleaned_data.get("title", ""),
                    typed_tags=tags,
                    accepted_tags=tags.accepted,
                    shown=tags.shown_record,
                    owner=self.user,
                    channel=tags.channel,
                )
            finally:
                for item in files:
                    item.close()
        if self.pending_upload is not None:  # used, or replaced by newly chosen images
            self.pending_upload.discard()
        return post

    def _files_to_save(self) -> list[Any]:
        """The newly chosen files, else the kept ones (opened here; the caller closes them)."""
        chosen = list(self.cleaned_data.get("images") or [])
        if chosen:
            return chosen
        return self.pending_upload.open()

    def kept_images(self) -> list[dict[str, str]]:
        return self.pending_upload.previews() if self.pending_upload else []
