"""The IMAGETAGS settings object, the extractor registry and the system checks."""

from __future__ import annotations

import re

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from imagetags.checks import check_extractor, check_task_queue
from imagetags.conf import DEFAULTS, imagetags_settings
from imagetags.services.extractors import extractor_config_from_spec, get_extractor

from .conftest import PROJECT_ROOT


def test_defaults_and_lazy_override():
    assert DEFAULTS["SUGGEST_LIMIT"] == imagetags_settings.SUGGEST_LIMIT
    with override_settings(IMAGETAGS={"SUGGEST_LIMIT": 3, "CLUSTERING": {"K": 40}}):
        assert imagetags_settings.SUGGEST_LIMIT == 3
        # A partial nested dict keeps the other defaults.
        assert imagetags_settings.CLUSTERING["K"] == 40
        assert imagetags_settings.CLUSTERING["ALGORITHM"] == "minibatch"
    assert DEFAULTS["SUGGEST_LIMIT"] == imagetags_settings.SUGGEST_LIMIT


def test_unknown_keys_are_an_error():
    with (
        override_settings(IMAGETAGS={"SUGEST_LIMIT": 3}),
        pytest.raises(ImproperlyConfigured, match="Unknown IMAGETAGS setting.*SUGEST_LIMIT"),
    ):
        imagetags_settings.SUGGEST_LIMIT  # noqa: B018
    with pytest.raises(AttributeError):
        imagetags_settings.NOT_A_SETTING  # noqa: B018


def test_settings_page_documents_every_setting():
    page = (PROJECT_ROOT / "docs" / "settings.md").read_text()
    documented = set(re.findall(r"^\| `([A-Z_]+)` \|", page, flags=re.MULTILINE))
    assert documented == set(DEFAULTS)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            "vgg16:imagenet",
            {"CLASS": "vgg16", "OPTIONS": {"weights": "imagenet", "pooling": "avg"}},
        ),
        ("vgg16:random", {"CLASS": "vgg16", "OPTIONS": {"weights": None, "pooling": "avg"}}),
        (
            "vgg16:random:flatten",
            {"CLASS": "vgg16", "OPTIONS": {"weights": None, "pooling": "flatten"}},
        ),
        (
            "vgg16:/w/vgg.h5",
            {"CLASS": "vgg16", "OPTIONS": {"weights": "/w/vgg.h5", "pooling": "avg"}},
        ),
        ("tflite:/m/a.tflite", {"CLASS": "tflite", "OPTIONS": {"model_path": "/m/a.tflite"}}),
        (
            "tflite:/m/a.tflite#Pool",
            {"CLASS": "tflite", "OPTIONS": {"model_path": "/m/a.tflite", "tensor": "Pool"}},
        ),
    ],
)
def test_extractor_specs(spec, expected):
    assert extractor_config_from_spec(spec) == expected


def test_bad_extractor_specs_and_classes():
    with pytest.raises(ImproperlyConfigured, match="Unknown extractor spec"):
        extractor_config_from_spec("resnet:imagenet")
    with pytest.raises(ImproperlyConfigured, match="needs a model path"):
        extractor_config_from_spec("tflite:")
    with pytest.raises(ImproperlyConfigured, match="could not be imported"):
        get_extractor({"CLASS": "no.such.Backend"})
    with pytest.raises(ImproperlyConfigured, match="not a FeatureExtractor"):
        get_extractor({"CLASS": "imagetags.conf.ImageTagsSettings"})


def test_registry_returns_one_instance_per_configuration():
    assert get_extractor() is get_extractor()
    other = {"CLASS": "vgg16", "OPTIONS": {"weights": None, "seed": 7, "input_size": 64}}
    assert get_extractor(other) is get_extractor(dict(other))
    assert get_extractor(other) is not get_extractor()


def test_checks_report_bad_configuration(tmp_path):
    with override_settings(IMAGETAGS={"EXTRACTOR": {"CLASS": "nope.Missing"}}):
        assert [e.id for e in check_extractor()] == ["imagetags.E001"]
    with override_settings(
        IMAGETAGS={
            "EXTRACTOR": {"CLASS": "tflite", "OPTIONS": {"model_path": str(tmp_path / "x.tflite")}}
        }
    ):
        assert [e.id for e in check_extractor()] == ["imagetags.E002"]
    with override_settings(
        IMAGETAGS={"EXTRACTOR": {"CLASS": "vgg16", "OPTIONS": {"weights": None}}}
    ):
        assert [e.id for e in check_extractor()] == ["imagetags.W001"]
    with override_settings(
        IMAGETAGS={"EXTRACTOR": {"CLASS": "vgg16", "OPTIONS": {"weights": "imagenet"}}}
    ):
        assert check_extractor() == []
    with override_settings(
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "imagetags"]
    ):
        assert [e.id for e in check_task_queue()] == ["imagetags.E003"]


def test_warm_up_loads_the_model_once_in_the_background(settings, db):
    from imagetags.apps import start_warm_up
    from imagetags.services.extractors.vgg16 import VGG16Extractor

    assert start_warm_up() is None  # off by default
    settings.IMAGETAGS = {
        "WARM_UP": True,
        "EXTRACTOR": {"CLASS": "vgg16", "OPTIONS": {"weights": None, "seed": 11, "input_size": 32}},
    }
    before = VGG16Extractor.loads
    thread = start_warm_up()
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert VGG16Extractor.loads == before + 1
    assert get_extractor()._model is not None
    start_warm_up().join(timeout=120)
    assert VGG16Extractor.loads == before + 1  # the same process never loads it twice
