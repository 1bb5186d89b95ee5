"""The numeric core: NumPy and scikit-learn only, no Django, nothing else from imagetags.

Everything that decides which tags an image gets lives here — the vector codec, the one spherical
k-means, counting tags once per post, neighbour voting, priors and evidence — so the site
(``imagetags.services``) and the offline evaluation (``evaluate_suggestions``) run the same lines.
An import-linter contract (``make lint``) keeps this package free of Django and of the rest of the
app.
"""
