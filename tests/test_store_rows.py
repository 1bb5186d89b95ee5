"""``store.insert_rows``: plain rows a rebuild writes (COPY on PostgreSQL, one prepared INSERT
elsewhere), on whichever database the suite runs (SQLite here, PostgreSQL in .ci/run)."""

from __future__ import annotations

import pytest
from django.db import IntegrityError, connection, transaction

from imagetags.models import Cluster, ClusterSet, ClusterSetStatus, Tag, TagFrequency
from imagetags.services.store import insert_rows


@pytest.fixture
def clusters(db) -> list[Cluster]:
    cluster_set = ClusterSet.objects.create(
        status=ClusterSetStatus.BUILDING, extractor_key="k", algorithm="kmeans", k=2, dim=2
    )
    return [
        Cluster.objects.create(
            cluster_set=cluster_set, index=i, centroid=b"\0" * 8, size=1, post_count=1
        )
        for i in range(2)
    ]


def test_rows_are_written_as_given(clusters):
    # Raw names (bulk_create skips Tag.save's normalising): COPY's own escapes must survive.
    names = ("crème brûlée", "tab\there", "back\\slash \\N")
    tags = Tag.objects.bulk_create([Tag(name=name, slug=f"t{i}") for i, name in enumerate(names)])
    assert all(tag.pk for tag in tags)
    rows = [
        (clusters[0].pk, tags[0].pk, 3),
        (clusters[1].pk, tags[1].pk, 70_000),
        (clusters[1].pk, tags[2].pk, 0),
    ]

    insert_rows(TagFrequency, ("cluster", "tag", "post_count"), iter(rows))

    stored = sorted(TagFrequency.objects.values_list("cluster_id", "tag__name", "post_count"))
    assert stored == sorted(
        [
            (clusters[0].pk, "crème brûlée", 3),
            (clusters[1].pk, "tab\there", 70_000),
            (clusters[1].pk, "back\\slash \\N", 0),
        ]
    )


def test_a_bad_row_is_a_django_integrity_error_and_writes_nothing(clusters):
    tag = Tag.objects.create(name="soup", slug="soup")
    rows = [(clusters[0].pk, tag.pk, 1), (clusters[1].pk, tag.pk, 2), (clusters[0].pk, tag.pk, 5)]

    # (cluster, tag) is unique. In a savepoint, as a caller's atomic block would hold it.
    with pytest.raises(IntegrityError), transaction.atomic():
        insert_rows(TagFrequency, ("cluster", "tag", "post_count"), rows)

    assert not TagFrequency.objects.exists()
    assert connection.vendor in ("sqlite", "postgresql")


def test_no_rows_is_nothing_to_do(clusters):
    insert_rows(TagFrequency, ("cluster", "tag", "post_count"), [])
    assert not TagFrequency.objects.exists()
