"""The admin: every page renders with data, every action does what it says, permissions hold.

The library is hand-built (vectors near known axes, see conftest.add_post), so the clusters are
known in advance and no model runs, except where an action enqueues real feature extraction.
django-q2 runs tasks inline in the test settings (``sync``), so "enqueued" can be checked by
its effect.
"""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission, User
from django.db import DatabaseError, connection
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from imagetags.models import (
    Cluster,
    ClusterMembership,
    ClusterSet,
    ClusterSetStatus,
    FeatureStatus,
    PostTag,
    RebuildLock,
    StockImage,
    SuggestionFeedback,
    Tag,
    TagFrequency,
    TagSource,
)
from imagetags.services.feedback import Acceptance, acceptance_stats
from imagetags.services.library_map import (
    MapCluster,
    _place_labels,
    build_library_map,
    cluster_labels,
)
from imagetags.services.rebuild import rebuild_clusters
from imagetags.services.vocabulary import TagMergeError, merge_tags

XSS = "<script>alert(1)</script>"
XSS_ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"


@pytest.fixture
def library(add_post):
    """Three topics on three axes, clustered with K=3; "food" is on every post."""
    posts = {
        "salmon": [add_post(["food", "salmon"], [0]) for _ in range(4)]
        + [add_post(["food", "salmon", "sushi"], [0, 0, 0])],
        "ramen": [add_post(["food", "ramen"], [1]) for _ in range(4)],
        "xss": [add_post(["food", XSS], [2]) for _ in range(3)],
    }
    cluster_set = rebuild_clusters(k=3, algorithm="kmeans")
    clusters = {
        topic: Cluster.objects.get(cluster_set=cluster_set, memberships__image__post=topic_posts[0])
        for topic, topic_posts in posts.items()
    }
    return {"set": cluster_set, "posts": posts, "clusters": clusters}


def feedback(tag: str, accepted: bool, channel: str = "widget", **kwargs) -> SuggestionFeedback:
    return SuggestionFeedback.objects.create(
        tag=Tag.objects.get_or_create(name=tag)[0], accepted=accepted, channel=channel, **kwargs
    )


def run_action(client: Client, model: str, action: str, ids, **extra):
    return client.post(
        reverse(f"admin:imagetags_{model}_changelist"),
        {"action": action, "_selected_action": [str(pk) for pk in ids], **extra},
    )


def frequencies(cluster: Cluster) -> dict[str, int]:
    return dict(cluster.tag_frequencies.values_list("tag__name", "post_count"))


# --- every page ------------------------------------------------------------------------------


def test_every_changelist_and_change_page_renders_with_data(admin_client, library):
    feedback("salmon", True, cluster_set=library["set"])
    image = StockImage.objects.filter(post=library["posts"]["salmon"][0]).get()
    objects = {
        "tag": Tag.objects.get(name="salmon"),
        "post": library["posts"]["salmon"][0],
        "stockimage": image,
        "clusterset": library["set"],
        "cluster": library["clusters"]["salmon"],
        "suggestionfeedback": SuggestionFeedback.objects.get(),
    }
    for model, obj in objects.items():
        listing = admin_client.get(reverse(f"admin:imagetags_{model}_changelist"))
        assert listing.status_code == 200, model
        assert listing.context["cl"].result_count > 0, model
        page = admin_client.get(reverse(f"admin:imagetags_{model}_change", args=[obj.pk]))
        assert page.status_code == 200, model
    index = admin_client.get(reverse("admin:app_list", args=["imagetags"]))
    assert reverse("admin:imagetags_clusterset_map") in index.content.decode()


def test_stock_image_list_shows_thumbnail_and_cluster_of_the_active_set(admin_client, library):
    image = StockImage.objects.filter(post=library["posts"]["ramen"][0]).get()
    cluster = library["clusters"]["ramen"]
    response = admin_client.get(reverse("admin:imagetags_stockimage_changelist"))
    html = response.content.decode()
    assert f'src="{image.image.url}"' in html
    assert reverse("admin:imagetags_cluster_change", args=[cluster.pk]) in html
    # The cluster filter lists the active set's clusters and narrows the list to one.
    filtered = admin_client.get(
        reverse("admin:imagetags_stockimage_changelist"), {"cluster": cluster.pk}
    )
    assert {obj.pk for obj in filtered.context["cl"].result_list} == set(
        StockImage.objects.filter(post__in=library["posts"]["ramen"]).values_list("pk", flat=True)
    )


def test_stock_image_list_filters_vectors_by_the_configured_extractor(
    admin_client, library, add_post
):
    other = add_post(["elsewhere"], [0], key="some/other/extractor").images.get()
    url = reverse("admin:imagetags_stockimage_changelist")

    stale = admin_client.get(url, {"vector": "stale"}).context["cl"].result_list
    usable = admin_client.get(url, {"vector": "usable"}).context["cl"].result_list

    assert [obj.pk for obj in stale] == [other.pk]  # ready, but made by another extractor
    assert len(usable) == StockImage.objects.count() - 1 and other not in usable


def test_post_list_shows_tags_with_their_source_and_filters_by_source(admin_client, library):
    post = library["posts"]["ramen"][0]
    noodles = Tag.objects.create(name="noodles")
    PostTag.objects.create(post=post, tag=noodles, source=TagSource.AUTO)
    response = admin_client.get(reverse("admin:imagetags_post_changelist"))
    assert 'class="imagetags-chip imagetags-source-auto" title="auto-applied">noodles<' in (
        response.content.decode()
    )
    auto = admin_client.get(reverse("admin:imagetags_post_changelist"), {"tag_source": "auto"})
    assert [obj.pk for obj in auto.context["cl"].result_list] == [post.pk]
    page = admin_client.get(reverse("admin:imagetags_post_change", args=[post.pk]))
    image = post.images.get()
    assert f'src="{image.image.url}"' in page.content.decode()  # inline image thumbnail


# --- actions ---------------------------------------------------------------------------------


def test_remove_auto_tags_action_removes_only_auto_tags_of_selected_posts(admin_client, library):
    first, second = library["posts"]["ramen"][:2]
    noodles = Tag.objects.create(name="noodles")
    for post in (first, second):
        PostTag.objects.create(post=post, tag=noodles, source=TagSource.AUTO)
    response = run_action(admin_client, "post", "remove_auto_tags", [first.pk])
    assert response.status_code == 302
    assert not first.post_tags.filter(source=TagSource.AUTO).exists()
    assert set(first.tags.values_list("name", flat=True)) == {"food", "ramen"}
    assert second.post_tags.filter(tag=noodles, source=TagSource.AUTO).exists()


def test_suggest_tags_action_shows_suggestions_with_evidence(admin_client, library, settings):
    # The evidence asserted below is the patent method's ("in n of N similar posts").
    settings.IMAGETAGS = {**settings.IMAGETAGS, "SUGGEST_METHOD": "cluster"}
    images = StockImage.objects.filter(post__in=library["posts"]["salmon"][:1])
    xss_image = StockImage.objects.filter(post=library["posts"]["xss"][0]).get()
    response = run_action(
        admin_client,
        "stockimage",
        "suggest_tags",
        [*images.values_list("pk", flat=True), xss_image.pk],
    )
    assert response.status_code == 200
    html = response.content.decode()
    table = html[html.index('id="imagetags-suggestions"') :]
    # The salmon image's post already has salmon: marked; the evidence counts posts, not images.
    assert re.search(r'imagetags-chip-on" title="in 5 of 5 similar posts">✓ salmon', table)
    assert 'title="in 1 of 5 similar posts">sushi' in table
    assert XSS_ESCAPED in table and XSS not in html
    assert reverse("admin:imagetags_cluster_change", args=[library["clusters"]["xss"].pk]) in table


def test_suggest_tags_action_says_why_without_clusters(admin_client, add_post):
    post = add_post(["food"], [0])
    response = run_action(
        admin_client, "stockimage", "suggest_tags", post.images.values_list("pk", flat=True)
    )
    assert "No clusters yet" in response.content.decode()


@pytest.mark.slow
def test_compute_features_again_enqueues_extraction(admin_client, library):
    from django_q.models import Task

    image = StockImage.objects.filter(post=library["posts"]["ramen"][0]).get()
    old_vector = bytes(image.vector)
    response = run_action(admin_client, "stockimage", "compute_features_again", [image.pk])
    assert response.status_code == 302
    # django-q2 runs the queued task inline in the tests: the real extractor replaced the
    # hand-built 8-d vector.
    assert Task.objects.filter(func="imagetags.tasks.extract_features", success=True).exists()
    image.refresh_from_db()
    assert image.feature_status == FeatureStatus.READY
    assert bytes(image.vector) != old_vector


def test_activate_older_set_rolls_back(admin_client, library):
    newer = rebuild_clusters(k=2, algorithm="kmeans")
    assert ClusterSet.objects.active() == newer
    response = run_action(admin_client, "clusterset", "activate_selected", [library["set"].pk])
    assert response.status_code == 302
    assert ClusterSet.objects.active() == library["set"]
    newer.refresh_from_db()
    assert newer.status == ClusterSetStatus.RETIRED


# --- merging tags ----------------------------------------------------------------------------


@pytest.fixture
def merge_library(add_post):
    """ "salmon" and "salmon fillet", sometimes on one post, across two clusters."""
    both = add_post(["salmon", "salmon fillet"], [0])  # both tags: must count once after merge
    fillet_only = add_post(["salmon fillet"], [0])
    salmon_auto = add_post([], [1])
    PostTag.objects.create(
        post=salmon_auto, tag=Tag.objects.get(name="salmon"), source=TagSource.AUTO
    )
    PostTag.objects.create(
        post=salmon_auto, tag=Tag.objects.get(name="salmon fillet"), source=TagSource.TYPED
    )
    salmon_only = add_post(["salmon"], [1])
    cluster_set = rebuild_clusters(k=2, algorithm="kmeans")
    feedback("salmon fillet", True, post=both)
    feedback("salmon fillet", False)
    return {
        "set": cluster_set,
        "both": both,
        "fillet_only": fillet_only,
        "auto": salmon_auto,
        "salmon_only": salmon_only,
    }


def test_merge_action_shows_a_confirmation_page_then_merges(admin_client, merge_library):
    salmon, fillet = Tag.objects.get(name="salmon"), Tag.objects.get(name="salmon fillet")
    first = run_action(admin_client, "tag", "merge_selected_tags", [salmon.pk, fillet.pk])
    assert first.status_code == 200
    assert first.templates[0].name == "admin/imagetags/tag/merge_tags.html"
    html = first.content.decode()
    assert f'name="target" value="{salmon.pk}"' in html
    assert f'name="target" value="{fillet.pk}"' in html
    assert Tag.objects.filter(name="salmon fillet").exists()  # nothing merged yet

    done = run_action(
        admin_client,
        "tag",
        "merge_selected_tags",
        [salmon.pk, fillet.pk],
        confirm="yes",
        target=str(salmon.pk),
    )
    assert done.status_code == 302
    assert not Tag.objects.filter(name="salmon fillet").exists()
    assert PostTag.objects.filter(tag=salmon).count() == 4


def test_merge_moves_post_tags_without_duplicates_and_keeps_the_best_source(merge_library):
    salmon, fillet = Tag.objects.get(name="salmon"), Tag.objects.get(name="salmon fillet")
    result = merge_tags([fillet], salmon)
    assert (result.posts_moved, result.duplicates_removed) == (1, 2)
    rows = dict(PostTag.objects.filter(tag=salmon).values_list("post_id", "source"))
    assert rows == {
        merge_library["both"].pk: TagSource.TYPED,
        merge_library["fillet_only"].pk: TagSource.TYPED,
        # The post had salmon auto-applied and "salmon fillet" typed: a person gave it.
        merge_library["auto"].pk: TagSource.TYPED,
        merge_library["salmon_only"].pk: TagSource.TYPED,
    }
    assert not Tag.objects.filter(pk=fillet.pk).exists()
    assert SuggestionFeedback.objects.filter(tag=salmon).count() == 2
    assert result.feedback_moved == 2


def test_merge_recounts_tag_frequencies_as_a_rebuild_would(merge_library):
    salmon, fillet = Tag.objects.get(name="salmon"), Tag.objects.get(name="salmon fillet")
    merge_tags([fillet], salmon)
    merged = {
        c.index: frequencies(c) for c in Cluster.objects.filter(cluster_set=merge_library["set"])
    }
    # Every post now has salmon (typed), each counted once per cluster: 2 posts in each.
    assert sorted(merged.values(), key=str) == [{"salmon": 2}, {"salmon": 2}]
    # Exactly what a fresh rebuild of the same library counts.
    fresh = rebuild_clusters(k=2, algorithm="kmeans")
    rebuilt = {c.index: frequencies(c) for c in Cluster.objects.filter(cluster_set=fresh)}
    assert sorted(rebuilt.values(), key=str) == sorted(merged.values(), key=str)


def test_merge_is_atomic(merge_library):
    salmon, fillet = Tag.objects.get(name="salmon"), Tag.objects.get(name="salmon fillet")
    before = (
        sorted(PostTag.objects.values_list("post_id", "tag_id", "source")),
        sorted(TagFrequency.objects.values_list("cluster_id", "tag_id", "post_count")),
        sorted(SuggestionFeedback.objects.values_list("pk", "tag_id")),
    )
    # A real database failure at the last step (deleting the merged tag), after every other
    # write: a trigger refuses it.
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE TRIGGER imagetags_test_refuse BEFORE DELETE ON imagetags_tag "
            "WHEN old.name = 'salmon fillet' BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
    with pytest.raises(DatabaseError, match="refused"):
        merge_tags([fillet], salmon)
    after = (
        sorted(PostTag.objects.values_list("post_id", "tag_id", "source")),
        sorted(TagFrequency.objects.values_list("cluster_id", "tag_id", "post_count")),
        sorted(SuggestionFeedback.objects.values_list("pk", "tag_id")),
    )
    assert after == before
    assert Tag.objects.filter(pk=fillet.pk).exists()


def test_merge_refuses_nothing_to_merge(merge_library):
    salmon = Tag.objects.get(name="salmon")
    with pytest.raises(TagMergeError):
        merge_tags([salmon], salmon)
    with pytest.raises(TagMergeError, match="do not exist"):
        merge_tags([999_999], salmon)


# --- tags and acceptance ---------------------------------------------------------------------


def test_tag_list_shows_usage_and_acceptance(admin_client, library):
    feedback("salmon", True)
    feedback("salmon", False)
    feedback("salmon", True, channel="api")
    feedback("ramen", False)
    response = admin_client.get(reverse("admin:imagetags_tag_changelist"), {"q": "salmon"})
    (salmon,) = response.context["cl"].result_list
    assert (salmon.post_count, salmon.feedback_shown, salmon.feedback_accepted) == (5, 3, 2)
    html = response.content.decode()
    assert "67 % <span" in html
    posts_url = f"/admin/imagetags/post/?post_tags__tag__id__exact={salmon.pk}"
    assert f'<a href="{posts_url}">5</a>' in html
    assert admin_client.get(posts_url).context["cl"].result_count == 5
    ordered = admin_client.get(reverse("admin:imagetags_tag_changelist"), {"o": "-5"})
    names = [tag.name for tag in ordered.context["cl"].result_list]
    assert names.index("salmon") < names.index("ramen")  # 67 % before 0 %


def test_acceptance_stats_overall_per_tag_and_filters(db):
    feedback("salmon", True)
    feedback("salmon", False)
    feedback("ramen", True, channel="api", method="cluster")
    feedback("food", False, channel="api")
    stats = acceptance_stats()
    assert stats.overall == Acceptance(accepted=2, shown=4)
    assert stats.overall.rate == 0.5
    assert list(stats.per_tag) == ["salmon", "food", "ramen"]  # most shown first, then name
    assert stats.per_tag["salmon"] == Acceptance(1, 2)
    assert stats.per_channel == {"api": Acceptance(1, 2), "widget": Acceptance(1, 2)}
    assert acceptance_stats(channel="api").per_tag == {
        "food": Acceptance(0, 1),
        "ramen": Acceptance(1, 1),
    }
    assert acceptance_stats(method="cluster").overall == Acceptance(1, 1)
    later = timezone.now() + timedelta(days=1)
    empty = acceptance_stats(since=later)
    assert empty.overall == Acceptance(0, 0) and empty.overall.rate is None
    assert empty.as_dict() == {
        "overall": {"accepted": 0, "shown": 0, "rate": None},
        "per_tag": {},
        "per_channel": {},
    }


def test_feedback_admin_summary_follows_the_filters(admin_client, db):
    feedback("salmon", True)
    feedback("salmon", False, channel="api")
    feedback("ramen", False, channel="api")
    everything = admin_client.get(reverse("admin:imagetags_suggestionfeedback_changelist"))
    assert everything.context_data["acceptance"].overall == Acceptance(1, 3)
    api = admin_client.get(
        reverse("admin:imagetags_suggestionfeedback_changelist"), {"channel__exact": "api"}
    )
    assert api.context_data["acceptance"].overall == Acceptance(0, 2)
    assert "0 %" in api.content.decode()


def test_cluster_set_list_shows_acceptance_summary(admin_client, library):
    feedback("salmon", True, cluster_set=library["set"])
    feedback("salmon", False, cluster_set=library["set"], channel="api")
    html = admin_client.get(reverse("admin:imagetags_clusterset_changelist")).content.decode()
    summary = html[html.index('id="imagetags-acceptance"') :]
    assert "50 %" in summary and "1 of 2 shown" in summary


# --- cluster sets: rebuild and progress ------------------------------------------------------


def test_rebuild_button_enqueues_a_rebuild_that_activates_a_new_set(admin_client, library):
    from django_q.models import Task

    listing = admin_client.get(reverse("admin:imagetags_clusterset_changelist"))
    rebuild_url = reverse("admin:imagetags_clusterset_rebuild")
    assert f'action="{rebuild_url}"' in listing.content.decode()
    response = admin_client.post(rebuild_url)
    assert response.status_code == 302
    assert response["Location"] == reverse("admin:imagetags_clusterset_changelist")
    new = ClusterSet.objects.active()
    assert new != library["set"]
    library["set"].refresh_from_db()
    assert library["set"].status == ClusterSetStatus.RETIRED
    assert Task.objects.filter(group="imagetags-rebuild", success=True).count() == 1
    after = admin_client.get(reverse("admin:imagetags_clusterset_changelist"))
    panel = after.content.decode()
    assert f"cluster set {new.pk}, K={new.k}, active" in panel
    assert after.context["refresh_seconds"] is None  # finished: no more refreshing


def test_rebuild_refuses_get(admin_client, library):
    response = admin_client.get(reverse("admin:imagetags_clusterset_rebuild"))
    assert response.status_code == 405
    assert ClusterSet.objects.count() == 1


def test_rebuild_refusal_is_reported(admin_client, db):
    # django-q2 runs the task inline here, so its refusal comes back at once.
    response = admin_client.post(reverse("admin:imagetags_clusterset_rebuild"), follow=True)
    assert "The library is empty" in response.content.decode()
    assert ClusterSet.objects.count() == 0


def test_failed_rebuild_task_is_reported(admin_client, db):
    from django_q.models import Task

    # What a worker records when a queued rebuild fails.
    Task.objects.create(
        id="f" * 32,
        name="imagetags-rebuild",
        func="imagetags.tasks.rebuild_clusters",
        group="imagetags-rebuild",
        result="Only 3 images have vectors, fewer than K=5. : Traceback ...",
        started=timezone.now(),
        stopped=timezone.now(),
        success=False,
    )
    html = admin_client.get(reverse("admin:imagetags_clusterset_changelist")).content.decode()
    panel = html[html.index('id="imagetags-rebuild-status"') :]
    assert re.search(r"failed 0.minutes ago:\s+Only 3 images have vectors", panel)


@pytest.fixture
def real_queue(monkeypatch):
    """django-q2 queues for real instead of running tasks inline, on the suite's broker (the
    ORM's, or Redis on CI's second run), emptied before and after: a Redis list outlives the
    test database, and a left-over task would be run by the next test's worker."""
    from django_q.brokers import get_broker
    from django_q.conf import Conf

    monkeypatch.setattr(
        Conf, "SYNC", False
    )  # read from Q_CLUSTER at import: patched, see tests/settings.py
    broker = get_broker()
    broker.purge_queue()
    yield broker
    broker.purge_queue()


def queued_functions(broker) -> list[str]:
    """The function names of the tasks waiting in the broker's queue (dequeued to read them:
    the fixture empties the queue at the end anyway)."""
    from django_q.signing import SignedPackage

    names = []
    while broker.queue_size():
        for _task_id, payload in broker.dequeue() or []:
            names.append(SignedPackage.loads(payload)["func"])
    return names


def _messages(response) -> list[str]:
    return [str(message) for message in response.context["messages"]]


def test_repeated_rebuild_clicks_queue_one_task(admin_client, library, real_queue):
    url = reverse("admin:imagetags_clusterset_rebuild")
    first = admin_client.post(url, follow=True)
    second = admin_client.post(url, follow=True)
    other_admin = Client()
    other_admin.force_login(User.objects.get(username="admin"))
    third = other_admin.post(url, follow=True)

    assert queued_functions(real_queue) == ["imagetags.tasks.rebuild_clusters"]
    assert any(m.startswith("Rebuild queued.") for m in _messages(first))
    for response in (second, third):
        assert any(
            m.startswith("A rebuild is already queued (since ") and "no second one was queued" in m
            for m in _messages(response)
        ), _messages(response)
    # Every admin's list refreshes while it waits in the queue, not only the clicker's.
    assert third.context["refresh_seconds"] is not None


def test_rebuild_click_while_a_set_is_building_queues_nothing(admin_client, library, real_queue):
    building = ClusterSet.objects.create(
        status=ClusterSetStatus.BUILDING, extractor_key="k", algorithm="kmeans", k=3, dim=8
    )
    building.report_progress(0.4, "Clustering.")

    response = admin_client.post(reverse("admin:imagetags_clusterset_rebuild"), follow=True)

    assert real_queue.queue_size() == 0
    assert any(
        m.startswith(f"A rebuild is already running (cluster set {building.pk}, started ")
        and "40%: Clustering." in m
        for m in _messages(response)
    ), _messages(response)


def test_queued_place_is_given_back_when_the_rebuild_ends(admin_client, library):
    # Inline (sync) here: the task ran and ended within the click, so the next click queues.
    from django_q.models import Task

    url = reverse("admin:imagetags_clusterset_rebuild")
    admin_client.post(url)
    admin_client.post(url)
    assert Task.objects.filter(group="imagetags-rebuild", success=True).count() == 2
    assert not RebuildLock.objects.exists()


def test_a_queued_rebuild_that_never_ran_expires(admin_client, library, real_queue):
    from imagetags.services.locks import QUEUED_EXPIRES_AFTER, QUEUED_NAME

    RebuildLock.objects.create(
        name=QUEUED_NAME, owner="lost", acquired=timezone.now() - QUEUED_EXPIRES_AFTER * 2
    )
    admin_client.post(reverse("admin:imagetags_clusterset_rebuild"))
    assert queued_functions(real_queue) == ["imagetags.tasks.rebuild_clusters"]
    assert RebuildLock.objects.get(name=QUEUED_NAME).owner != "lost"


@pytest.mark.django_db(transaction=True)
def test_simultaneous_reservations_take_one_place():
    import threading

    from django.db import connections

    from imagetags.services.locks import RebuildInProgress, reserve_queued_rebuild

    barrier = threading.Barrier(3)
    outcomes: list[str] = []

    def click() -> None:
        try:
            barrier.wait()
            outcomes.append(reserve_queued_rebuild())
        except RebuildInProgress as exc:
            outcomes.append(f"refused: {exc}")
        finally:
            connections.close_all()

    threads = [threading.Thread(target=click) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    refused = [o for o in outcomes if o.startswith("refused: A rebuild is already queued")]
    assert len(outcomes) == 3 and len(refused) == 2, outcomes


def test_building_set_shows_progress_and_refreshes_until_silent(admin_client, library):
    building = ClusterSet.objects.create(
        status=ClusterSetStatus.BUILDING, extractor_key="k", algorithm="kmeans", k=3, dim=8
    )
    building.report_progress(0.6, "Clustered in 7 iterations.")
    response = admin_client.get(reverse("admin:imagetags_clusterset_changelist"))
    html = response.content.decode()
    assert '<meta http-equiv="refresh" content="3">' in html
    assert '<progress value="0.600" max="1"></progress>' in html
    assert "Clustered in 7 iterations." in html
    ClusterSet.objects.filter(pk=building.pk).update(heartbeat=timezone.now() - timedelta(hours=2))
    stalled = admin_client.get(reverse("admin:imagetags_clusterset_changelist")).content.decode()
    assert 'http-equiv="refresh"' not in stalled
    assert "has probably died" in stalled


# --- clusters and the library map ------------------------------------------------------------


def test_cluster_list_shows_the_active_set_unless_asked(admin_client, library):
    newer = rebuild_clusters(k=2, algorithm="kmeans")
    url = reverse("admin:imagetags_cluster_changelist")
    active = admin_client.get(url).context["cl"].result_list
    assert {c.cluster_set_id for c in active} == {newer.pk} and len(active) == 2
    older = admin_client.get(url, {"set": library["set"].pk}).context["cl"].result_list
    assert {c.cluster_set_id for c in older} == {library["set"].pk} and len(older) == 3
    assert admin_client.get(url, {"set": "all"}).context["cl"].result_count == 5


def test_cluster_set_page_is_for_looking_only(admin_client, library):
    page = admin_client.get(reverse("admin:imagetags_clusterset_change", args=[library["set"].pk]))
    assert page.status_code == 200
    assert 'name="_save"' not in page.content.decode()
    assert f"/admin/imagetags/clusterset/map/?set={library['set'].pk}" in page.content.decode()


def test_cluster_page_shows_tags_and_members_nearest_first(admin_client, library):
    cluster = library["clusters"]["salmon"]
    response = admin_client.get(reverse("admin:imagetags_cluster_change", args=[cluster.pk]))
    html = response.content.decode()
    bars = html[html.index('id="imagetags-frequencies"') :]
    assert re.search(r"<td>food</td>.*?5 of 5 posts", bars, re.S)
    assert re.search(r"<td>sushi</td>.*?1 of 5 posts", bars, re.S)
    grid = html[html.index('id="imagetags-members"') :]
    shown = re.findall(r'<a href="/admin/imagetags/stockimage/(\d+)/change/"', grid)
    expected = list(
        ClusterMembership.objects.filter(cluster=cluster)
        .order_by("-similarity", "image_id")
        .values_list("image_id", flat=True)
    )
    assert [int(pk) for pk in shown] == expected and len(expected) == 7
    assert f"?cluster={cluster.pk}" in html  # link to all its images


def test_cluster_pages_escape_tag_names(admin_client, library):
    cluster = library["clusters"]["xss"]
    for url in (
        reverse("admin:imagetags_cluster_change", args=[cluster.pk]),
        reverse("admin:imagetags_cluster_changelist"),
        reverse("admin:imagetags_clusterset_change", args=[library["set"].pk]),
        reverse("admin:imagetags_stockimage_changelist"),
        reverse("admin:imagetags_clusterset_map"),
    ):
        html = admin_client.get(url).content.decode()
        assert XSS not in html, url
        assert XSS_ESCAPED in html, url


def test_library_map_draws_every_image_and_one_linked_label_per_cluster(admin_client, library):
    response = admin_client.get(reverse("admin:imagetags_clusterset_map"))
    assert response.status_code == 200
    html = response.content.decode()
    svg = html[html.index('<svg class="imagetags-map"') :]
    svg = svg[: svg.index("</svg>")]
    dots = "".join(re.findall(r'<g class="imagetags-dots".*?</g>', svg))
    assert dots.count("<circle ") == StockImage.objects.count() == 14
    links = re.findall(
        r'<a class="imagetags-label" href="([^"]+)">.*?<text [^>]*>([^<]*)</text>', svg
    )
    assert sorted(href for href, _text in links) == sorted(
        reverse("admin:imagetags_cluster_change", args=[c.pk]) for c in library["clusters"].values()
    )
    # Labels name what sets a cluster apart: "food" is on every post and labels none of them.
    # (Long names are shortened on the map; the legend below it has them whole.)
    assert sorted(text for _href, text in links) == sorted(
        ["salmon", "ramen", "&lt;script&gt;alert(1)&lt;/scrip…"]
    )


def test_library_map_samples_large_libraries_but_labels_every_cluster(library):
    library_map = build_library_map(max_points=5)
    assert (library_map.members, library_map.drawn, library_map.sampled) == (14, 5, True)
    assert sum(len(c.points) for c in library_map.clusters) == 5
    assert len(library_map.clusters) == 3
    for cluster in library_map.clusters:
        assert 0 <= cluster.label_x <= library_map.width
        assert 0 <= cluster.label_y <= library_map.height


def test_library_map_without_clusters_says_so(admin_client, db):
    response = admin_client.get(reverse("admin:imagetags_clusterset_map"))
    assert response.status_code == 200
    assert "no active cluster set yet" in response.content.decode()


def test_cluster_labels_prefer_distinctive_tags(library):
    labels = cluster_labels(library["set"])
    salmon = labels[library["clusters"]["salmon"].pk]
    assert salmon.text == "salmon"
    assert salmon.top_tags[0] == ("food", 5) and ("salmon", 5) in salmon.top_tags


def test_map_labels_do_not_overlap():
    import numpy as np

    from imagetags.services.library_map import ClusterLabel

    clusters = [
        MapCluster(
            i, i, 10 - i, 1, ClusterLabel(f"tag {i}", ()), "#000", np.empty((0, 2)), 100, 100
        )
        for i in range(6)
    ]
    _place_labels(clusters, 400, 300)
    boxes = [
        (
            c.label_x - len(c.label_text) * 3.5,
            c.label_y - 12,
            c.label_x + len(c.label_text) * 3.5,
            c.label_y,
        )
        for c in clusters
    ]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3])


# --- permissions -----------------------------------------------------------------------------


def _user(name: str, *, staff: bool, perms: tuple[str, ...] = ()) -> User:
    user = User.objects.create_user(name, password="x", is_staff=staff)
    for codename in perms:
        user.user_permissions.add(Permission.objects.get(codename=codename))
    return user


VIEW_PERMS = tuple(
    f"view_{model}"
    for model in ("tag", "post", "stockimage", "clusterset", "cluster", "suggestionfeedback")
)


def _pages(library) -> list[str]:
    return [
        *(
            reverse(f"admin:imagetags_{model}_changelist")
            for model in (
                "tag",
                "post",
                "stockimage",
                "clusterset",
                "cluster",
                "suggestionfeedback",
            )
        ),
        reverse("admin:imagetags_clusterset_map"),
        reverse("admin:imagetags_cluster_change", args=[library["clusters"]["salmon"].pk]),
    ]


@pytest.mark.parametrize(
    ("who", "page_status", "rebuild_status"),
    [
        ("anonymous", 302, 302),
        ("not staff", 302, 302),
        ("staff without permissions", 403, 403),
        ("staff with view permissions", 200, 403),
        ("superuser", 200, 302),
    ],
)
def test_permission_matrix(client, library, who, page_status, rebuild_status):
    if who == "not staff":
        client.force_login(_user("visitor", staff=False, perms=VIEW_PERMS))
    elif who == "staff without permissions":
        client.force_login(_user("clerk", staff=True))
    elif who == "staff with view permissions":
        client.force_login(_user("viewer", staff=True, perms=VIEW_PERMS))
    elif who == "superuser":
        client.force_login(User.objects.create_superuser("root", password="x"))
    login = reverse("admin:login")
    for url in _pages(library):
        response = client.get(url)
        assert response.status_code == page_status, url
        if page_status == 302:
            assert response["Location"].startswith(login), url
    sets_before = ClusterSet.objects.count()
    rebuild = client.post(reverse("admin:imagetags_clusterset_rebuild"))
    assert rebuild.status_code == rebuild_status
    if rebuild_status == 302:
        expected = (
            login
            if who in ("anonymous", "not staff")
            else reverse("admin:imagetags_clusterset_changelist")
        )
        assert rebuild["Location"].startswith(expected)
    assert ClusterSet.objects.count() == sets_before + (1 if who == "superuser" else 0)


def test_view_only_staff_cannot_run_changing_actions(client, library):
    client.force_login(_user("viewer", staff=True, perms=VIEW_PERMS))
    listing = client.get(reverse("admin:imagetags_tag_changelist"))
    assert listing.context["action_form"] is None  # merging is the tag list's only action
    salmon, food = Tag.objects.get(name="salmon"), Tag.objects.get(name="food")
    run_action(
        client, "tag", "merge_selected_tags", [salmon.pk, food.pk], confirm="yes", target=food.pk
    )
    assert Tag.objects.filter(pk=salmon.pk).exists()
    retired = rebuild_clusters(k=2, algorithm="kmeans")
    run_action(client, "clusterset", "activate_selected", [library["set"].pk])
    assert ClusterSet.objects.active() == retired
    noodles = Tag.objects.create(name="noodles")
    post = library["posts"]["ramen"][0]
    PostTag.objects.create(post=post, tag=noodles, source=TagSource.AUTO)
    run_action(client, "post", "remove_auto_tags", [post.pk])
    assert post.post_tags.filter(source=TagSource.AUTO).exists()
    # Suggesting changes nothing, so viewing is enough for it.
    suggestions = run_action(
        client, "stockimage", "suggest_tags", post.images.values_list("pk", flat=True)
    )
    assert suggestions.status_code == 200 and "ramen" in suggestions.content.decode()


def test_staff_with_add_permission_may_rebuild(client, library):
    client.force_login(_user("operator", staff=True, perms=(*VIEW_PERMS, "add_clusterset")))
    listing = client.get(reverse("admin:imagetags_clusterset_changelist"))
    assert reverse("admin:imagetags_clusterset_rebuild") in listing.content.decode()
    assert client.post(reverse("admin:imagetags_clusterset_rebuild")).status_code == 302
    assert ClusterSet.objects.active() != library["set"]
