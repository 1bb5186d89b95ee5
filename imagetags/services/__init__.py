"""The work itself, as plain typed functions and classes.

Views, tasks, admin and management commands stay thin and call into these modules.
"""
