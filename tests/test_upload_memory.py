"""A request's uploads are decoded one at a time: the API's suggestions never hold them all."""

from __future__ import annotations

import io

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse
from PIL import Image

from imagetags.models import StockImage
from imagetags.services.extractors import get_extractor
from imagetags.services.features import compute_features
from imagetags.services.rebuild import rebuild_clusters


@pytest.fixture
def library(make_post):
    for seed in range(3):
        make_post(["tomato", "red"], color=(220, 20, 20), pattern="noise", seed=seed)
        make_post(["blueberry", "blue"], color=(20, 40, 220), pattern="noise", seed=seed)
    compute_features(StockImage.objects.all())
    return rebuild_clusters(k=2, algorithm="kmeans")


def big_gif(name: str, colour: int) -> SimpleUploadedFile:
    # A few KB of file, 3000 × 3000 pixels decoded (27 MB as RGB).
    buffer = io.BytesIO()
    Image.new("P", (3000, 3000), colour).save(buffer, format="GIF")
    return SimpleUploadedFile(name, buffer.getvalue(), content_type="image/gif")


def test_ten_file_suggestion_request_never_holds_ten_decoded_images(
    admin_client: Client, library, monkeypatch, decoded_images_alive
):
    extractor = get_extractor()
    embedded_sizes: list[tuple[int, int]] = []
    real_embed = type(extractor).embed_batch

    def spying_embed(self, images):
        embedded_sizes.extend(image.size for image in images)
        return real_embed(self, images)

    monkeypatch.setattr(type(extractor), "embed_batch", spying_embed)
    files = [big_gif(f"{i}.gif", i) for i in range(10)]
    response = admin_client.post(reverse("imagetags_api:suggestions"), {"image": files})
    assert response.status_code == 200, response.content
    assert len(decoded_images_alive) == 10  # each file decoded once
    assert max(decoded_images_alive) == 0  # ... and let go before the next one
    # What waits for the model is its input, not the decoded 3000 × 3000 picture.
    assert len(embedded_sizes) == 10
    assert all(max(size) <= extractor.decode_size for size in embedded_sizes)
