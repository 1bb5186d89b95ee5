"""The library-wide tag shares voting subtracts are computed by the worker and stored with the
set (services.priors): a web process's first suggestion reads one row instead of aggregating
over every member (9 s at 1,000,000 images)."""

from __future__ import annotations

import pytest

from imagetags.models import ClusterSet
from imagetags.services import priors
from imagetags.services.assign import assign_to_active_set
from imagetags.services.serving import serving_cache
from imagetags.services.suggest import suggest

from .conftest import unit


def stored_shares(cluster_set: ClusterSet) -> dict:
    return ClusterSet.objects.get(pk=cluster_set.pk).priors


def test_a_rebuild_stores_the_shares_and_the_first_suggestion_reads_them(
    soups_and_cakes, monkeypatch
):
    value = stored_shares(soups_and_cakes)
    assert value["n_images"] == 7
    assert value["shares"]["post"] == priors.compute(soups_and_cakes.pk, "post")
    assert value["shares"]["post"]["food"] == 1.0 and value["shares"]["post"]["soup"] == 4 / 7

    def no_aggregate(*args, **kwargs):
        raise AssertionError("a web process aggregated the shares itself")

    monkeypatch.setattr(priors, "compute", no_aggregate)
    serving_cache().reset()  # a fresh process
    assert [t.name for t in suggest(unit(1, 0.05, seed=3)).tags][:2] == ["soup", "food"]


def test_a_set_without_stored_shares_computes_them_where_needed(soups_and_cakes):
    query = unit(1, 0.05, seed=3)
    with_stored = suggest(query).as_dict()
    ClusterSet.objects.filter(pk=soups_and_cakes.pk).update(priors={})  # built before 0007
    serving_cache().reset()
    assert suggest(query).as_dict() == with_stored


def test_the_worker_stores_them_again_once_the_set_has_grown(
    soups_and_cakes, add_post, monkeypatch, django_capture_on_commit_callbacks
):
    monkeypatch.setattr(priors, "GROWTH", 0.01)
    small = [add_post(["food", "soup", "miso"], [1]) for _n in range(3)]
    with django_capture_on_commit_callbacks(execute=True):
        assign_to_active_set([image for post in small for image in post.images.all()])
    # 3 new members of 10: below the floor of 10 new members, the stored shares stay.
    assert stored_shares(soups_and_cakes)["n_images"] == 7

    more = [add_post(["food", "soup", "miso"], [1]) for _n in range(11)]
    with django_capture_on_commit_callbacks(execute=True):
        assign_to_active_set([image for post in more for image in post.images.all()])
    value = stored_shares(soups_and_cakes)
    assert value["n_images"] == 21
    assert value["shares"]["post"]["miso"] == pytest.approx(14 / 21)


def test_no_shares_are_stored_when_voting_subtracts_none(add_post, settings):
    from imagetags.services.rebuild import rebuild_clusters

    settings.IMAGETAGS = {**settings.IMAGETAGS, "VOTING": {"PRIOR_WEIGHT": 0.0}}
    for axis in range(2):
        add_post(["food"], [axis])
    assert stored_shares(rebuild_clusters(k=2, algorithm="kmeans")) == {}
