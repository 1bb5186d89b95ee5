"""TagSuggestionWidget: a tag text input that suggests tags for the images being uploaded.

The widget renders three inputs under one name ``<name>``:

- ``<name>``: the tags as text (``salmon, "cuba libre", rice``), like django-taggit;
- ``<name>_suggestions``: hidden JSON kept by the script: which suggestions were shown (name,
  score, rank), which were accepted, the cluster set that answered, the channel, and the
  suggestions token (the server's signed record of what was shown; only it makes feedback count);
- ``<name>_accept``: checkboxes, one per suggestion, on the no-JavaScript second step.

A small dependency-free script (``static/imagetags/tag-suggestions.js``, shipped through
:attr:`TagSuggestionWidget.media`) finds the widget by its ``data-imagetags-*`` attributes,
watches the form's file input, asks the JSON view ``imagetags:suggestions`` and shows the answer
as toggle buttons ("chips"). Without the script, the form still works (see ``imagetags.forms``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from django import forms
from django.core.exceptions import ImproperlyConfigured
from django.urls import NoReverseMatch, reverse

from imagetags.conf import imagetags_settings
from imagetags.models import normalize_tag_name
from imagetags.services.suggest import SuggestedTag

__all__ = ["TagSuggestionWidget", "format_tag_input"]


def format_tag_input(names: Iterable[str]) -> str:
    """Tag names as text that ``parse_tag_input`` reads back into the same names.

    Names with a comma, a space or a double quote are quoted (``"cuba libre"``), a quote inside
    doubled as in CSV (``a "b" c`` -> ``"a ""b"" c"``), and names are joined with ``", "`` —
    django-taggit's ``edit_string_for_tags`` convention plus the escape. The script's
    ``formatTags`` (``static/imagetags/tag-suggestions.js``) writes the same.
    """
    out = []
    for name in names:
        if any(ch in name for ch in ',"') or any(ch.isspace() for ch in name):
            name = '"' + name.replace('"', '""') + '"'
        out.append(name)
    return ", ".join(out)


class TagSuggestionWidget(forms.Widget):
    """Tag text input with suggestion chips (JavaScript) or checkboxes (no JavaScript).

    ``images_field``: the name of the file input in the same form whose images get suggestions
    (every file input of the form when none has that name); ``suggest_url``: the JSON view
    (default: ``reverse("imagetags:suggestions")``). ``suggestions`` (a list of
    :class:`~imagetags.services.suggest.SuggestedTag`) are rendered as checkboxes; the form's
    second step sets them.
    """

    template_name = "imagetags/widgets/tag_suggestions.html"

    def __init__(
        self,
        attrs: dict[str, Any] | None = None,
        *,
        images_field: str = "images",
        suggest_url: str | None = None,
    ) -> None:
        super().__init__(attrs)
        self.images_field = images_field
        self.suggest_url = suggest_url
        self.suggestions: list[SuggestedTag] = []

    @property
    def media(self) -> forms.Media:
        return forms.Media(
            css={"all": ["imagetags/tag-suggestions.css"]},
            js=["imagetags/tag-suggestions.js"],
        )

    def get_suggest_url(self) -> str:
        if self.suggest_url:
            return str(self.suggest_url)
        try:
            return reverse("imagetags:suggestions")
        except NoReverseMatch:
            raise ImproperlyConfigured(
                "TagSuggestionWidget needs the suggestions view: add "
                'path("imagetags/", include("imagetags.urls")) to your URLconf, '
                "or pass suggest_url=... to the widget or SuggestedTagsField."
            ) from None

    def value_from_datadict(self, data: Any, files: Any, name: str) -> dict[str, Any] | None:
        if self.value_omitted_from_data(data, files, name):
            return None
        ticked = data.getlist(f"{name}_accept") if hasattr(data, "getlist") else []
        return {
            "text": data.get(name, ""),
            "ticked": ticked,
            "state": data.get(f"{name}_suggestions", ""),
        }

    def value_omitted_from_data(self, data: Any, files: Any, name: str) -> bool:
        return all(key not in data for key in (name, f"{name}_suggestions", f"{name}_accept"))

    def _text_state_ticked(self, value: Any) -> tuple[str, dict[str, Any], set[str]]:
        """Split a bound value (dict from the request) or an initial value (a list of names,
        e.g. a ``TagSelection``, or text) into the text, the JSON state and the ticked names."""
        if isinstance(value, dict):
            try:
                state = json.loads(value.get("state") or "{}")
            except ValueError:
                state = {}
            ticked = {normalize_tag_name(name) for name in value.get("ticked") or []}
            return str(value.get("text") or ""), state if isinstance(state, dict) else {}, ticked
        if isinstance(value, list | tuple):
            state = value.state() if hasattr(value, "state") else {}
            return format_tag_input(value), state, set(value)
        return ("" if value is None else str(value)), {}, set()

    def get_context(self, name: str, value: Any, attrs: dict[str, Any] | None) -> dict[str, Any]:
        context = super().get_context(name, value, attrs)
        text, state, ticked = self._text_state_ticked(value)
        if self.suggestions:
            # Server-made suggestions (second step) carry their evidence into the state, so a
            # re-rendered page and the script can show it again.
            state["shown"] = [
                {"name": tag.name, "score": tag.score, "rank": rank, "evidence": tag.evidence}
                for rank, tag in enumerate(self.suggestions, 1)
            ]
        choices = []
        for item in state.get("shown") or []:
            if isinstance(item, dict) and isinstance(item.get("name"), str):
                evidence = item.get("evidence")
                choices.append(
                    {
                        "name": item["name"],
                        "evidence": evidence if isinstance(evidence, str) else "",
                        "checked": normalize_tag_name(item["name"]) in ticked,
                    }
                )
        widget = context["widget"]
        widget["attrs"]["class"] = f"imagetags-input {widget['attrs'].get('class', '')}".strip()
        widget.update(
            {
                "value": text,
                "state": json.dumps(state) if state else "",
                "choices": choices,
                "suggest_url": self.get_suggest_url(),
                "images_field": self.images_field,
                "max_bytes": imagetags_settings.MAX_UPLOAD_BYTES,
                "max_files": imagetags_settings.MAX_FILES_PER_POST,
            }
        )
        return context
