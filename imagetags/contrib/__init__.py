"""Optional sub-apps a site adds to ``INSTALLED_APPS`` when it uses what they set up."""
