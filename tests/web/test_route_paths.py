"""``path()`` in templates (app/web/templating.route_paths) finds routes by name in a dict instead of Starlette's
search through every route: it must give Starlette's path for every named route, included routers' too."""

from __future__ import annotations

import pytest
from starlette.routing import NoMatchFound

from app.settings import Settings
from app.web.main import create_app
from app.web.templating import _named_routes, route_paths


def test_every_named_route_gives_starlettes_path(tmp_path):
    app = create_app(Settings(data_dir=tmp_path))
    path = route_paths(app)
    routes = list(_named_routes(app.router.routes))
    assert len(routes) > 50 and {"feature_page", "api_feature", "trace_page", "static"} <= {r.name for r in routes}
    for route in routes:
        params = {name: "7" for name in getattr(route, "param_convertors", {})}
        if route.name in ("static", "docs_assets"):
            params = {"path": "app.css"}
        assert path(route.name, **params) == app.url_path_for(route.name, **params), route.name
    assert path("feature_page", run=3, layer=2, index=17) == "/runs/3/features/2/17"
    with pytest.raises(NoMatchFound):
        path("no_such_route")
    with pytest.raises(NoMatchFound):
        path("feature_page", run=3)  # a missing parameter: Starlette's own error


def test_a_served_app_freezes_what_startup_made(tmp_path) -> None:
    """``served_app`` (what ``serve`` runs) takes the startup objects out of the collector's scans (app/web/main.py
    says why: full collections stalled ~1 request in 100–200 by 110–190 ms); apps built for tests are left alone."""
    import gc

    from app.settings import Settings
    from app.web.main import create_app, served_app

    settings = Settings(database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", data_dir=tmp_path)
    gc.unfreeze()
    try:
        create_app(settings)
        assert gc.get_freeze_count() == 0
        served_app(settings)
        assert gc.get_freeze_count() > 10_000  # the imports' and the app's objects
    finally:
        gc.unfreeze()
