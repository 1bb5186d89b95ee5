"""Admin integration: the library, its features and tags, the cluster sets, and a map of it all.

One module per model family; each registers its own admins when imported, and Django's admin
autodiscovery imports this package. Thin by design: the work (merging tags, the map's
projection, acceptance figures, the rebuild queue) lives in ``imagetags.services``; these
modules query, check permissions and render.
"""

from imagetags.admin import clusters, feedback, images, posts, tags

__all__ = ["clusters", "feedback", "images", "posts", "tags"]
