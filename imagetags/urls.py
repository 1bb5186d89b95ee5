"""URLs of the upload widget: ``path("imagetags/", include("imagetags.urls"))``."""

from django.urls import path

from imagetags import views

app_name = "imagetags"
urlpatterns = [
    path("suggestions/", views.suggestions, name="suggestions"),
    path("upload/", views.PostUploadView.as_view(), name="upload"),
]
