"""django-imagetags: tag suggestions for uploaded images, learned from a site's own library."""

__version__ = "0.1.0"
