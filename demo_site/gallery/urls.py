from django.urls import path

from demo_site.gallery import views

app_name = "gallery"
urlpatterns = [
    path("", views.home, name="home"),
    path("upload/", views.UploadView.as_view(), name="upload"),
]
