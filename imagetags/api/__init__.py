"""The REST API (Django REST Framework + drf-spectacular), an optional part of the app.

Install the ``api`` extra, add ``rest_framework``, ``drf_spectacular`` and
``drf_spectacular_sidecar`` to ``INSTALLED_APPS`` and include ``imagetags.api.urls``. Nothing
outside this package imports DRF, so sites without the extra never load it.
"""

# drf-spectacular settings the API's schema and UI rely on; a site merges them into its own:
# SPECTACULAR_SETTINGS = {**imagetags.api.SPECTACULAR_SETTINGS, "TITLE": "My site API"}.
SPECTACULAR_SETTINGS = {
    "TITLE": "django-imagetags API",
    "DESCRIPTION": "Tag suggestions for images, from the tags of similar images in the library.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    # Separate request and response components, so multipart file fields show as binary uploads.
    "COMPONENT_SPLIT_REQUEST": True,
    # Swagger UI and ReDoc from the drf-spectacular-sidecar package's static files: no CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}
