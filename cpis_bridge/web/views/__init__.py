"""Server-rendered web views for people (the duty-team view under /la/, the clinician view under /ed/), each a
sub-application wired by setup."""

from __future__ import annotations

from aiohttp import web


def setup(app: web.Application) -> None:
    from cpis_bridge.web.views import duty, ed

    app.add_subapp(duty.PREFIX, duty.make_app(app))
    app.add_subapp(ed.PREFIX, ed.make_app(app))
