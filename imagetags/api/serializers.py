"""Input validation and response shapes of the REST API; the work itself is in services."""

from __future__ import annotations

from typing import Any

from django.utils.translation import gettext_lazy as _
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.fields import empty
from rest_framework.utils import html

from imagetags.conf import imagetags_settings
from imagetags.images import check_upload_size
from imagetags.models import Cluster, Post, PostTag, StockImage, Tag
from imagetags.services.shown import (
    MAX_SHOWN_SUGGESTIONS,
    InvalidSuggestionsToken,
    ShownRecord,
    read_token,
)
from imagetags.services.suggest import MergedSuggestions, Suggestions
from imagetags.services.suggestion_requests import (
    IMAGE_FIELD,
    MAX_SUGGEST_LIMIT,
    MAX_TOKEN_LENGTH,
    InvalidRequest,
    parse_suggestion_request,
)
from imagetags.services.tagging import (
    InvalidTagName,
    clean_tag_name,
    max_tags_per_post,
    parse_tag_input,
    too_many_tags_message,
)

from .filters import MAX_ID

SUGGESTIONS_TOKEN_HELP = (
    "The signed record of the suggestions shown: their names, ranks and scores, the cluster set "
    "and the method that answered, bound to the user who asked and valid for "
    "SUGGESTIONS_TOKEN_MAX_AGE seconds. Send it unchanged with the post (suggestions_token) for "
    "the suggestions to count as shown; nothing else can."
)


@extend_schema_field(
    {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1}
)
class UploadListField(serializers.ListField):
    """One or more files under one multipart field name (the field repeated for several)."""

    def __init__(self, **kwargs: Any) -> None:
        # Empty files reach open_image, which says "The file is empty." like every other path.
        kwargs.setdefault("child", serializers.FileField(allow_empty_file=True, use_url=False))
        kwargs.setdefault("allow_empty", False)
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> list[Any]:
        files = super().to_internal_value(data)
        for upload in files:
            check_upload_size(upload)
        return files


# "default": [] so Swagger's "Try it out" starts empty instead of sending the tag "string".
@extend_schema_field({"type": "array", "items": {"type": "string"}, "default": []})
class TagListField(serializers.Field):
    """Tag names typed like django-taggit's TagField: commas separate, double quotes group, and
    without either, spaces separate. The field may be repeated; every value is parsed."""

    default_error_messages = {"invalid": _("Send tag names as text.")}

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("required", False)
        kwargs.setdefault("default", list)
        super().__init__(**kwargs)

    def get_value(self, dictionary: Any) -> Any:
        if html.is_html_input(dictionary):
            return dictionary.getlist(self.field_name) if self.field_name in dictionary else empty
        return dictionary.get(self.field_name, empty)

    def to_internal_value(self, data: Any) -> list[str]:
        values = [data] if isinstance(data, str) else data
        if not isinstance(values, list | tuple) or not all(isinstance(v, str) for v in values):
            self.fail("invalid")
        names: list[str] = []
        for text in values:
            for name in parse_tag_input(text):
                try:
                    names.append(clean_tag_name(name))
                except InvalidTagName as exc:
                    raise serializers.ValidationError(str(exc)) from None
        return list(dict.fromkeys(names))

    def to_representation(self, value: Any) -> list[str]:
        return list(value)


# An example of 0 (every tag), so Swagger's "Try it out" does not fill in 1 (almost no tag).
@extend_schema_field(
    {"type": "number", "format": "double", "minimum": 0, "maximum": 1, "example": 0}
)
class ShareField(serializers.FloatField):
    """A share from 0 to 1."""


class SuggestionParamsSerializer(serializers.Serializer):
    """How many suggestions, how common a tag must be, and which tags to leave out.

    The fields describe the request for the OpenAPI schema; checking it is the job of
    ``services.suggestion_requests.parse_suggestion_request``, the validator the widget's JSON
    view uses too (same limits, same messages). The validated data is ``{"request":
    SuggestionRequest}``.
    """

    # Whether the request carries files in the field "image".
    takes_files = False

    limit = serializers.IntegerField(
        required=False,
        min_value=1,
        max_value=MAX_SUGGEST_LIMIT,
        help_text="Most tags to return (default: the SUGGEST_LIMIT setting).",
    )
    threshold = ShareField(
        required=False,
        min_value=0.0,
        max_value=1.0,
        help_text="Only tags whose score (see the response's tags) is at least this share "
        "(default: the SUGGEST_THRESHOLD setting).",
    )
    exclude = TagListField(
        help_text="Tags to leave out (e.g. those the post already has), typed like tag input: "
        "commas separate, double quotes group; at most MAX_TAGS_PER_POST names."
    )

    def to_internal_value(self, data: Any) -> dict[str, Any]:
        files = None
        if self.takes_files:
            getlist = getattr(data, "getlist", None)
            files = getlist(IMAGE_FIELD) if getlist is not None else data.get(IMAGE_FIELD, [])
            files = files if isinstance(files, list | tuple) else [files]
        try:
            return {"request": parse_suggestion_request(data, files)}
        except InvalidRequest as exc:
            raise serializers.ValidationError(exc.errors) from None


class SuggestionRequestSerializer(SuggestionParamsSerializer):
    takes_files = True

    image = UploadListField(
        help_text="The image; repeat the field for the images of one post (suggestions merge). "
        "At most MAX_FILES_PER_POST images of at most MAX_UPLOAD_BYTES each.",
    )
    suggestions_token = serializers.CharField(
        required=False,
        allow_blank=True,
        max_length=MAX_TOKEN_LENGTH,
        help_text="The suggestions_token of an earlier answer for the same post: the new token "
        "also covers its suggestions (same cluster set and method), so the latest token is the "
        "only one to send with the post. An invalid one is ignored.",
    )


# For the ivf method (the default) a tag's evidence is a vote of the most similar posts (or
# their uploaders, VOTING["VOTE_BY"] = "owner"), not a count over the nearest cluster's posts.
SCORE_HELP = (
    "What the tags are ordered by, 0 to 1. Method cluster: the share of the nearest cluster's "
    "posts that carry the tag. Method ivf: the similarity-weighted share of the voters (the most "
    "similar posts, or their uploaders) that carry it, less a small prior for tags that are "
    "common everywhere."
)


class SuggestedTagSerializer(serializers.Serializer):
    name = serializers.CharField()
    score = serializers.FloatField(help_text=SCORE_HELP)
    post_count = serializers.IntegerField(
        help_text="How many of the voters carry the tag: posts of the nearest cluster (method "
        "cluster), or of the most similar posts or uploaders (method ivf)."
    )
    cluster_posts = serializers.IntegerField(
        help_text="How many voters the evidence counts: the nearest cluster's posts (method "
        "cluster), or the most similar posts or uploaders that voted (method ivf)."
    )
    evidence = serializers.CharField(
        help_text='e.g. "in 9 of 40 similar posts" (cluster), "on 6 of the 20 most similar '
        'posts" (ivf)'
    )


SUGGESTED_TAG_FIELDS = tuple(SuggestedTagSerializer._declared_fields)


class SuggestionsSerializer(serializers.Serializer):
    """Suggested tags for one image, or for several merged (each tag keeps its best score)."""

    tags = SuggestedTagSerializer(many=True)
    cluster = serializers.IntegerField(
        allow_null=True, help_text="The nearest cluster's id; null when several images were sent."
    )
    clusters = serializers.ListField(
        child=serializers.IntegerField(), help_text="The nearest cluster of each image, in order."
    )
    cluster_set = serializers.IntegerField(help_text="The cluster set (version) that answered.")
    extractor = serializers.CharField(help_text="Key of the feature extractor.")
    method = serializers.CharField(
        help_text="The method that ranked these tags (ivf or cluster); the suggestions token "
        "records the same one."
    )
    suggestions_token = serializers.CharField(help_text=SUGGESTIONS_TOKEN_HELP)

    def to_representation(self, instance: Suggestions | MergedSuggestions) -> dict[str, Any]:
        # Built directly from the service's dataclasses: the declared fields above describe the
        # response (OpenAPI), and DRF's field-by-field path (a deep copy of the tag fields for
        # every response) cost a few tenths of a millisecond on the busiest endpoint.
        # tests/test_api.py checks that both name the same keys.
        per_image = instance.per_image if isinstance(instance, MergedSuggestions) else [instance]
        return {
            "tags": [
                {name: getattr(tag, name) for name in SUGGESTED_TAG_FIELDS} for tag in instance.tags
            ],
            "cluster": per_image[0].cluster if len(per_image) == 1 else None,
            "clusters": [result.cluster for result in per_image],
            "cluster_set": per_image[0].cluster_set,
            "extractor": per_image[0].extractor,
            "method": instance.method or "",
            # Signed by the view, which knows the user (services.shown.sign_shown).
            "suggestions_token": self.context.get("suggestions_token", ""),
        }


class TagSerializer(serializers.ModelSerializer):
    # Slugs keep non-ASCII letters (Tag.save slugifies with allow_unicode), so says the schema.
    slug = serializers.SlugField(allow_unicode=True, read_only=True)
    post_count = serializers.IntegerField(read_only=True, help_text="Posts carrying the tag.")

    class Meta:
        model = Tag
        fields = ["id", "name", "slug", "post_count"]


class PostImageSerializer(serializers.ModelSerializer):
    url = serializers.SerializerMethodField()

    class Meta:
        model = StockImage
        fields = ["id", "url", "width", "height", "feature_status"]

    def get_url(self, image: StockImage) -> str:
        request = self.context.get("request")
        url = image.image.url
        return request.build_absolute_uri(url) if request is not None else url


class PostTagSerializer(serializers.ModelSerializer):
    name = serializers.CharField(source="tag.name")

    class Meta:
        model = PostTag
        fields = ["name", "source"]


class PostSerializer(serializers.ModelSerializer):
    images = PostImageSerializer(many=True, read_only=True)
    tags = PostTagSerializer(source="post_tags", many=True, read_only=True)

    class Meta:
        model = Post
        fields = ["id", "title", "owner", "created", "images", "tags"]


class ShownSuggestionSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=200)
    score = serializers.FloatField(required=False, allow_null=True)
    rank = serializers.IntegerField(required=False, allow_null=True, min_value=1, max_value=32767)


class PostCreateSerializer(serializers.Serializer):
    images = UploadListField(help_text="The post's images; repeat the field for several.")
    title = serializers.CharField(required=False, allow_blank=True, max_length=200, default="")
    tags = TagListField(help_text="Tags the person typed (source typed).")
    suggested_tags = TagListField(
        help_text="Suggestions the person accepted (source suggested; wins over tags). Together "
        "with tags at most MAX_TAGS_PER_POST names."
    )
    suggestions_token = serializers.CharField(
        required=False,
        allow_blank=True,
        max_length=100_000,
        help_text="The suggestions_token of the suggestion response the person was shown. One "
        "feedback row (accepted or not) is saved per suggestion it lists, with the cluster set "
        "and method that answered. A tampered, expired or another user's token is a 400.",
    )
    shown_suggestions = serializers.JSONField(
        required=False,
        help_text=(
            "Optional JSON list narrowing the token's suggestions to those still shown when the "
            'post was saved: names, or objects {"name", ...}. Names not in the token are '
            "dropped; ranks and scores come from the token. Needs suggestions_token."
        ),
    )

    def validate_shown_suggestions(self, value: Any) -> list[str]:
        if not isinstance(value, list):
            raise serializers.ValidationError("Expected a JSON list of names or objects.")
        if len(value) > MAX_SHOWN_SUGGESTIONS:
            raise serializers.ValidationError(
                f"At most {MAX_SHOWN_SUGGESTIONS} suggestions can have been shown; "
                f"{len(value)} were sent."
            )
        items = [{"name": item} if isinstance(item, str) else item for item in value]
        nested = ShownSuggestionSerializer(data=items, many=True)
        if not nested.is_valid():
            raise serializers.ValidationError(nested.errors)
        return [item["name"] for item in nested.validated_data]

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        count = len(dict.fromkeys([*attrs.get("suggested_tags", []), *attrs.get("tags", [])]))
        if count > max_tags_per_post():
            raise serializers.ValidationError({"tags": [too_many_tags_message(count)]})
        token = attrs.pop("suggestions_token", "")
        claimed = attrs.pop("shown_suggestions", None)
        if not token:
            if claimed:
                raise serializers.ValidationError(
                    {
                        "shown_suggestions": [
                            "Send the suggestions_token of the suggestion response these "
                            "came from; without it nothing counts as shown."
                        ]
                    }
                )
            attrs["shown"] = ShownRecord()
            return attrs
        request = self.context.get("request")
        try:
            record = read_token(token, getattr(request, "user", None))
        except InvalidSuggestionsToken as exc:
            raise serializers.ValidationError({"suggestions_token": [str(exc)]}) from None
        attrs["shown"] = record.narrowed(claimed)
        return attrs


class ClusterTagSerializer(serializers.Serializer):
    name = serializers.CharField()
    post_count = serializers.IntegerField()
    score = serializers.FloatField(help_text="Share of the cluster's posts that carry the tag.")


class ClusterSerializer(serializers.ModelSerializer):
    top_tags = serializers.SerializerMethodField()

    class Meta:
        model = Cluster
        fields = ["id", "cluster_set", "index", "size", "post_count", "top_tags"]

    @extend_schema_field(ClusterTagSerializer(many=True))
    def get_top_tags(self, cluster: Cluster) -> list[dict[str, Any]]:
        # tag_frequencies is prefetched in frequency order (see ClusterViewSet).
        top = self.context.get("top") or imagetags_settings.SUGGEST_LIMIT
        posts = cluster.post_count or 1
        return [
            {
                "name": row.tag.name,
                "post_count": row.post_count,
                "score": round(row.post_count / posts, 4),
            }
            for row in list(cluster.tag_frequencies.all())[:top]
        ]


class ClusterFilterSerializer(serializers.Serializer):
    cluster_set = serializers.IntegerField(
        required=False,
        min_value=1,
        max_value=MAX_ID,
        help_text="Clusters of this set (default: the active set).",
    )
    top = serializers.IntegerField(
        required=False,
        min_value=1,
        max_value=1000,
        help_text="Top tags per cluster (default: the SUGGEST_LIMIT setting).",
    )


class ErrorSerializer(serializers.Serializer):
    detail = serializers.CharField()


# A 400 as DRF sends it: field errors {"field": ["message", ...]}, or {"detail": "message"} when
# the body could not be parsed at all.
FIELD_ERRORS_SCHEMA = {
    "type": "object",
    "additionalProperties": {
        "oneOf": [{"type": "array", "items": {"type": "string"}}, {"type": "string"}]
    },
}
