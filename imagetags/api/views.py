"""REST API views: validate the input, call imagetags.services, shape the answer.

Every view takes its authentication, permission and throttle classes from the IMAGETAGS
settings when a request comes in (not at import, so ``override_settings`` works), and turns
every kind of bad input into a DRF error response: 400 field errors, 413 for oversized uploads,
415 for a body that is not multipart, 409 when there is nothing to suggest from yet.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from django.conf import settings
from django.core.exceptions import (
    ImproperlyConfigured,
    RequestDataTooBig,
    SuspiciousMultipartForm,
    TooManyFieldsSent,
    TooManyFilesSent,
)
from django.db.models import Count, Prefetch, QuerySet
from django.http.multipartparser import MultiPartParserError
from django.utils.module_loading import import_string
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
)
from rest_framework import mixins, status, viewsets
from rest_framework.exceptions import (
    APIException,
    ErrorDetail,
    NotFound,
    ParseError,
    ValidationError,
)
from rest_framework.filters import OrderingFilter
from rest_framework.generics import GenericAPIView
from rest_framework.pagination import PageNumberPagination
from rest_framework.parsers import MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.settings import api_settings

from imagetags.conf import imagetags_settings
from imagetags.images import InvalidImage, UploadTooLarge
from imagetags.models import (
    Cluster,
    ClusterSetStatus,
    FeedbackChannel,
    Post,
    PostTag,
    StockImage,
    Tag,
    TagFrequency,
)
from imagetags.services.posts import create_post
from imagetags.services.shown import sign_shown
from imagetags.services.suggest import (
    MergedSuggestions,
    Suggestions,
    SuggestionUnavailable,
    suggest,
)
from imagetags.services.suggestion_requests import InvalidRequest, suggest_for_request

from .filters import MAX_ID, BoundedSearchFilter, object_id
from .serializers import (
    FIELD_ERRORS_SCHEMA,
    ClusterFilterSerializer,
    ClusterSerializer,
    ErrorSerializer,
    PostCreateSerializer,
    PostSerializer,
    SuggestionParamsSerializer,
    SuggestionRequestSerializer,
    SuggestionsSerializer,
    TagSerializer,
)
from .uploads import PayloadTooLarge, guard_upload


class SuggestionsUnavailable(APIException):
    """409: the library has no active clusters yet, or they belong to another extractor."""

    status_code = status.HTTP_409_CONFLICT
    default_detail = "Suggestions are not available yet."
    default_code = "suggestions_unavailable"


def configured_classes(key: str) -> list[type]:
    """The classes named by the dotted paths of ``IMAGETAGS[key]``, imported now."""
    paths = getattr(imagetags_settings, key)
    if not isinstance(paths, list | tuple):
        raise ImproperlyConfigured(f"IMAGETAGS[{key!r}] must be a list of dotted paths.")
    classes = []
    for path in paths:
        try:
            classes.append(import_string(path) if isinstance(path, str) else path)
        except ImportError as exc:
            raise ImproperlyConfigured(
                f"IMAGETAGS[{key!r}]: {path!r} could not be imported ({exc})."
            ) from exc
    return classes


def as_api_exception(exc: Exception) -> Exception:
    """Django's multipart limits as DRF errors, so they get a JSON body, not an HTML page.

    DRF's parser converts malformed bodies (``MultiPartParserError``) itself, but lets
    Django's ``DATA_UPLOAD_MAX_*`` refusals through as ``SuspiciousOperation``.
    """
    if isinstance(exc, UploadTooLarge):  # a file over MAX_UPLOAD_BYTES, seen while parsing
        return PayloadTooLarge(str(exc))
    if isinstance(exc, RequestDataTooBig):
        return PayloadTooLarge(
            "The form fields (other than files) are larger than the limit of "
            f"{settings.DATA_UPLOAD_MAX_MEMORY_SIZE:,} bytes."
        )
    if isinstance(exc, TooManyFilesSent):
        return ParseError(
            f"Too many files in one request (more than {settings.DATA_UPLOAD_MAX_NUMBER_FILES})."
        )
    if isinstance(exc, TooManyFieldsSent):
        return ParseError(
            f"Too many form fields in one request (more than "
            f"{settings.DATA_UPLOAD_MAX_NUMBER_FIELDS})."
        )
    if isinstance(exc, MultiPartParserError | SuspiciousMultipartForm):
        return ParseError(f"Malformed multipart data: {exc}")
    return exc


@contextlib.contextmanager
def service_errors(file_field: str = "image") -> Iterator[None]:
    """409 when suggestions cannot be made yet; 400 on ``file_field`` for a bad image, and
    the request validator's field errors as they are."""
    try:
        yield
    except SuggestionUnavailable as exc:
        raise SuggestionsUnavailable(str(exc)) from exc
    except InvalidRequest as exc:
        raise ValidationError(exc.errors) from exc
    except InvalidImage as exc:
        raise ValidationError({file_field: [str(exc)]}) from exc


def own_posts(request: Request, queryset: QuerySet[Post]) -> QuerySet[Post]:
    """A scope for ``API_POSTS_VISIBLE_TO``: each user sees their own posts; staff see all."""
    if request.user.is_staff:
        return queryset
    if not request.user.is_authenticated:
        return queryset.none()
    return queryset.filter(owner=request.user)


def visible_posts(request: Request, queryset: QuerySet[Post]) -> QuerySet[Post]:
    """The posts ``request`` may see: ``API_POSTS_VISIBLE_TO`` applied, or all of them.

    The library is shared by default (suggestions come from everyone's tags, and the API shows
    the posts they come from); sites whose posts are private name a scope such as
    :func:`own_posts`.
    """
    scope = imagetags_settings.API_POSTS_VISIBLE_TO
    if scope is None:
        return queryset
    if isinstance(scope, str):
        try:
            scope = import_string(scope)
        except ImportError as exc:
            raise ImproperlyConfigured(
                f"IMAGETAGS['API_POSTS_VISIBLE_TO']: {scope!r} could not be imported ({exc})."
            ) from exc
    return scope(request, queryset)


class ImageTagsPagination(PageNumberPagination):
    """Pages of ``API_PAGE_SIZE`` items; ``?page_size=`` up to ten times that."""

    page_size_query_param = "page_size"

    @property
    def page_size(self) -> int:
        return imagetags_settings.API_PAGE_SIZE

    @property
    def max_page_size(self) -> int:
        return 10 * imagetags_settings.API_PAGE_SIZE

    def get_page_number(self, request: Request, paginator: Any) -> Any:
        # DRF reads an empty ?page= as page 1; it is not a number, like ?page=abc.
        if request.query_params.get(self.page_query_param) == "":
            raise NotFound(self.invalid_page_message)
        return super().get_page_number(request, paginator)

    def get_page_size(self, request: Request) -> int:
        # DRF ignores a page_size it cannot read; a client that asks for one should hear why.
        text = request.query_params.get(self.page_size_query_param)
        if text is None:
            return self.page_size
        if not (text.isascii() and text.isdigit()) or int(text[:19]) < 1:
            raise ValidationError(
                {self.page_size_query_param: [f"A whole number from 1 to {self.max_page_size}."]}
            )
        return min(int(text[:19]) if len(text) < 19 else self.max_page_size, self.max_page_size)

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            parameter["schema"]["minimum"] = 1
            if parameter["name"] == self.page_query_param:
                parameter["description"] = (
                    "A page number (from 1); a page past the last one is a 404."
                )
            else:
                parameter["description"] = (
                    f"Items per page (default {self.page_size}); more than "
                    f"{self.max_page_size} count as {self.max_page_size}."
                )
        return parameters


def flat_errors(detail: Any) -> dict[str, list[Any]]:
    """DRF error detail as the documented 400 shape: ``{"field": ["message", ...]}``.

    Nested serializers and filters give other shapes (a bare list; ``[{"name": [...]}]`` for a
    list of objects): their messages are kept, prefixed with where they apply ("item 2: name:
    ..."), so every 400 matches ``FIELD_ERRORS_SCHEMA``.
    """
    if not isinstance(detail, dict):
        return {api_settings.NON_FIELD_ERRORS_KEY: list(_messages(detail))}
    return {str(field): list(_messages(value)) for field, value in detail.items()}


def _messages(detail: Any, where: str = "") -> Iterator[Any]:
    if isinstance(detail, dict):
        for key, value in detail.items():
            # DRF keys the errors of a list's items by their 0-based index.
            label = f"item {key + 1}" if isinstance(key, int) else key
            yield from _messages(value, f"{where}{label}: ")
    elif isinstance(detail, list | tuple):
        nested = any(isinstance(item, dict | list | tuple) for item in detail)
        for position, item in enumerate(detail, start=1):
            if nested and not item:
                continue  # an item without errors in a list of objects
            yield from _messages(item, f"{where}item {position}: " if nested else where)
    else:
        yield ErrorDetail(f"{where}{detail}", code=getattr(detail, "code", None))


class ImageTagsAPIMixin:
    """Policies from the IMAGETAGS settings, upload guards, and DRF-shaped parse errors."""

    throttle_scope = "imagetags"
    pagination_class = ImageTagsPagination
    # Any path segment reaches the view, so a malformed or huge id is a JSON 404 from
    # get_object (not Django's HTML page, and never an integer overflow in the database).
    lookup_value_regex = "[^/]+"

    def get_object(self) -> Any:
        lookup = self.lookup_url_kwarg or self.lookup_field
        self.kwargs[lookup] = object_id(self.kwargs[lookup])
        return super().get_object()

    def get_authenticators(self) -> list[Any]:
        if imagetags_settings.API_AUTHENTICATION_CLASSES is None:
            return [cls() for cls in api_settings.DEFAULT_AUTHENTICATION_CLASSES]
        return [cls() for cls in configured_classes("API_AUTHENTICATION_CLASSES")]

    def get_permissions(self) -> list[Any]:
        return [cls() for cls in configured_classes("API_PERMISSION_CLASSES")]

    def get_throttles(self) -> list[Any]:
        return [cls() for cls in configured_classes("API_THROTTLE_CLASSES")]

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        # Before authentication: session authentication reads the body (CSRF check).
        guard_upload(request)
        super().initial(request, *args, **kwargs)

    def handle_exception(self, exc: Exception) -> Response:
        exc = as_api_exception(exc)
        if isinstance(exc, ValidationError):
            exc = ValidationError(flat_errors(exc.detail))
        return super().handle_exception(exc)


_ERROR = ErrorSerializer
ERROR_RESPONSES = {
    400: OpenApiResponse(
        FIELD_ERRORS_SCHEMA,
        description='Invalid input: field errors such as {"image": ["photo.jpg: The file is '
        'not an image (…)."]}, or {"detail": …} for a malformed multipart body.',
    ),
    401: OpenApiResponse(
        _ERROR,
        description="Not authenticated, with a WWW-Authenticate challenge (when the first "
        "authentication class has one, e.g. Basic or Token).",
    ),
    403: OpenApiResponse(
        _ERROR,
        description="Not authenticated (session authentication), CSRF check failed, or "
        "permission denied.",
    ),
    404: OpenApiResponse(
        _ERROR,
        description="No such object (or an id that is not a whole number), or no such page: "
        "?page= past the last page or not a number.",
    ),
    409: OpenApiResponse(
        _ERROR,
        description="No suggestions possible yet: the library has no clusters, or they were "
        "built with another extractor. The detail says which command fixes it.",
    ),
    413: OpenApiResponse(
        _ERROR,
        description="A file is larger than MAX_UPLOAD_BYTES, or the body cannot fit the upload "
        "limits (refused before it is read).",
    ),
    415: OpenApiResponse(_ERROR, description="The body is not multipart/form-data."),
    429: OpenApiResponse(_ERROR, description="Throttled: try again after Retry-After seconds."),
}
RETRY_AFTER = OpenApiParameter(
    "Retry-After",
    OpenApiTypes.INT,
    location=OpenApiParameter.HEADER,
    response=[429],
    description="Seconds until the throttle lets the client in again.",
)

# Path ids are documented as the integers they are; any other segment is a JSON 404.
OBJECT_ID = OpenApiParameter(
    "id",
    {"type": "integer", "minimum": 0, "maximum": MAX_ID},
    location=OpenApiParameter.PATH,
    description="The object's id.",
)


def errors(*codes: int) -> dict[int, OpenApiResponse]:
    """Documented error responses; every endpoint can also answer 401, 403 and 429."""
    return {code: ERROR_RESPONSES[code] for code in (*codes, 401, 403, 429)}


def suggestions_body(
    result: Suggestions | MergedSuggestions, request: Request, previous: str = ""
) -> dict[str, Any]:
    """The response body, with the signed record of what it shows (``services.shown``)."""
    token = sign_shown(
        result.tags,
        cluster_set_id=result.cluster_set,
        method=result.method or "",
        user=request.user,
        previous=previous,
    )
    return SuggestionsSerializer(result, context={"suggestions_token": token}).data


class SuggestionView(ImageTagsAPIMixin, GenericAPIView):
    """Suggested tags for uploaded images (nothing is saved)."""

    parser_classes = [MultiPartParser]
    serializer_class = SuggestionRequestSerializer

    @extend_schema(
        operation_id="imagetags_suggest",
        summary="Suggest tags for uploaded images",
        description="Send one `image` for its suggestions, or repeat the field for the images "
        "of one post: suggestions are then merged (each tag keeps its best score). "
        "Nothing is stored.",
        request={"multipart/form-data": SuggestionRequestSerializer},
        responses={200: SuggestionsSerializer, **errors(400, 409, 413, 415)},
        parameters=[RETRY_AFTER],
    )
    def post(self, request: Request) -> Response:
        params = self.get_serializer(data=request.data)
        params.is_valid(raise_exception=True)
        suggestion_request = params.validated_data["request"]
        with service_errors("image"):
            result = suggest_for_request(suggestion_request)
        return Response(suggestions_body(result, request, suggestion_request.previous_token))


class ImageSuggestionView(ImageTagsAPIMixin, GenericAPIView):
    """Suggested tags for a stored image (its stored vector when current)."""

    serializer_class = SuggestionParamsSerializer

    def get_queryset(self) -> QuerySet[StockImage]:
        # Images of the posts the client may see (API_POSTS_VISIBLE_TO): others are a 404.
        if imagetags_settings.API_POSTS_VISIBLE_TO is None:
            return StockImage.objects.all()
        posts = visible_posts(self.request, Post.objects.all())
        return StockImage.objects.filter(post__in=posts)

    @extend_schema(
        operation_id="imagetags_image_suggestions",
        summary="Suggest tags for a stored image",
        description="Uses the image's stored feature vector when it is current, else embeds "
        "its file now. The image's own post is part of the library, so pass `exclude` to "
        "leave out the tags it already has.",
        parameters=[OBJECT_ID, SuggestionParamsSerializer, RETRY_AFTER],
        responses={200: SuggestionsSerializer, **errors(400, 404, 409)},
    )
    def get(self, request: Request, pk: str) -> Response:
        image = self.get_object()
        params = self.get_serializer(data=request.query_params)
        params.is_valid(raise_exception=True)
        with service_errors():
            try:
                result = suggest(image, **params.validated_data["request"].options())
            except (InvalidImage, OSError) as exc:
                # The client sent nothing wrong: the stored image has no vector yet and its
                # file cannot be read, which is the library's state, not a bad request.
                raise SuggestionsUnavailable(
                    f"Image {image.pk} has no current feature vector and its file cannot be "
                    f"read: {exc}"
                ) from exc
        return Response(suggestions_body(result, request))


@extend_schema_view(
    list=extend_schema(
        summary="List tags with usage counts",
        responses={200: TagSerializer(many=True), **errors(400, 404)},
    ),
    retrieve=extend_schema(
        summary="A tag with its usage count",
        parameters=[OBJECT_ID],
        responses={200: TagSerializer, **errors(404)},
    ),
)
class TagViewSet(ImageTagsAPIMixin, viewsets.ReadOnlyModelViewSet):
    """Tags with the number of posts carrying each; ``?search=`` and ``?ordering=``."""

    serializer_class = TagSerializer
    filter_backends = [BoundedSearchFilter, OrderingFilter]
    search_fields = ["name"]
    ordering_fields = ["name", "post_count"]
    ordering = ["name"]

    def get_queryset(self) -> QuerySet[Tag]:
        return Tag.objects.annotate(post_count=Count("post_tags"))


@extend_schema_view(
    list=extend_schema(
        summary="List posts", responses={200: PostSerializer(many=True), **errors(400, 404)}
    ),
    retrieve=extend_schema(
        summary="A post with its images and tags",
        parameters=[OBJECT_ID],
        responses={200: PostSerializer, **errors(404)},
    ),
    create=extend_schema(
        summary="Create a post from uploaded images and tags",
        description="Saves the images, the typed `tags` (source typed) and the accepted "
        "`suggested_tags` (source suggested), at most MAX_TAGS_PER_POST together, and one "
        "feedback row per suggestion listed in `suggestions_token` (the signed record a "
        "suggestion response returned; `shown_suggestions` may narrow it). All or nothing: a "
        "bad file, tag or token saves no row and no file.",
        request={"multipart/form-data": PostCreateSerializer},
        responses={201: PostSerializer, **errors(400, 413, 415)},
        parameters=[RETRY_AFTER],
    ),
)
class PostViewSet(ImageTagsAPIMixin, mixins.CreateModelMixin, viewsets.ReadOnlyModelViewSet):
    """Posts with their images' URLs and their tags with sources; create with uploads."""

    parser_classes = [MultiPartParser]
    queryset = Post.objects.prefetch_related(
        "images",
        Prefetch("post_tags", queryset=PostTag.objects.select_related("tag").order_by("tag__name")),
    )

    def get_queryset(self) -> QuerySet[Post]:
        return self.scope_queryset(self.request, super().get_queryset())

    def scope_queryset(self, request: Request, queryset: QuerySet[Post]) -> QuerySet[Post]:
        """The posts this client may list and read; override, or set API_POSTS_VISIBLE_TO."""
        return visible_posts(request, queryset)

    def get_serializer_class(self) -> type:
        return PostCreateSerializer if self.action == "create" else PostSerializer

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        params = self.get_serializer(data=request.data)
        params.is_valid(raise_exception=True)
        data = params.validated_data
        with service_errors("images"):
            post = create_post(
                files=data["images"],
                title=data["title"],
                typed_tags=data["tags"],
                accepted_tags=data["suggested_tags"],
                shown=data["shown"],
                owner=request.user,
                channel=FeedbackChannel.API,
            )
        # Unscoped: the new post is answered even when the scope would not list it.
        post = super().get_queryset().get(pk=post.pk)
        body = PostSerializer(post, context=self.get_serializer_context()).data
        location = self.reverse_action("detail", args=[post.pk])
        return Response(body, status=status.HTTP_201_CREATED, headers={"Location": location})


_CLUSTER_FILTERS = [ClusterFilterSerializer]


@extend_schema_view(
    list=extend_schema(
        summary="Clusters of the active set (or ?cluster_set=) with their top tags",
        parameters=_CLUSTER_FILTERS,
        responses={200: ClusterSerializer(many=True), **errors(400, 404)},
    ),
    retrieve=extend_schema(
        summary="A cluster with its top tags",
        parameters=[OBJECT_ID, *_CLUSTER_FILTERS],
        responses={200: ClusterSerializer, **errors(400, 404)},
    ),
)
class ClusterViewSet(ImageTagsAPIMixin, viewsets.ReadOnlyModelViewSet):
    """Clusters with their most frequent tags (post counts and shares of the cluster's posts)."""

    serializer_class = ClusterSerializer

    def filters(self) -> dict[str, Any]:
        params = ClusterFilterSerializer(data=self.request.query_params)
        params.is_valid(raise_exception=True)
        return params.validated_data

    def get_queryset(self) -> QuerySet[Cluster]:
        frequencies = TagFrequency.objects.select_related("tag").order_by(
            "-post_count", "tag__name"
        )
        queryset = Cluster.objects.prefetch_related(
            Prefetch("tag_frequencies", queryset=frequencies)
        ).order_by("cluster_set", "index")
        if self.action != "list":
            return queryset  # any set's cluster by id, retired ones included
        cluster_set = self.filters().get("cluster_set")
        if cluster_set is None:
            return queryset.filter(cluster_set__status=ClusterSetStatus.ACTIVE)
        return queryset.filter(cluster_set_id=cluster_set)

    def get_serializer_context(self) -> dict[str, Any]:
        context = super().get_serializer_context()
        if getattr(self, "request", None) is not None:
            context["top"] = self.filters().get("top")
        return context
