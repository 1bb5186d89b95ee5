"""The API's default throttle: DRF's scoped throttle with its rate read from IMAGETAGS."""

from __future__ import annotations

import re

from django.core.exceptions import ImproperlyConfigured
from rest_framework.throttling import ScopedRateThrottle

from imagetags.conf import imagetags_settings

# DRF only looks at the first letter of the period ("60/month" would mean per minute), so the
# rate is checked against the spellings that mean what they say.
_RATE = re.compile(r"^\d+/(s|sec|second|m|min|minute|h|hour|d|day)$")


class ImageTagsRateThrottle(ScopedRateThrottle):
    """Limits each user (each IP address when anonymous) in the views' scope ``imagetags``.

    The rate is ``IMAGETAGS["API_THROTTLE_RATE"]``, read on every request: DRF's own
    ``DEFAULT_THROTTLE_RATES`` are copied into the class once at import, so ``override_settings``
    could not change them.
    """

    def get_rate(self) -> str | None:
        rate = imagetags_settings.API_THROTTLE_RATE
        if rate is not None and not _RATE.match(str(rate)):
            raise ImproperlyConfigured(
                f"IMAGETAGS['API_THROTTLE_RATE'] is {rate!r}; use 'N/s', 'N/min', 'N/hour', "
                "'N/day' or None."
            )
        return rate
