"""Admin pieces both apps use."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib import admin
from django.contrib.admin.apps import AdminConfig
from django.contrib.admin.utils import quote
from django.contrib.admin.views.main import ChangeList
from django.db.models import Model
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import reverse
from django.utils.functional import cached_property


class SingletonAdmin(admin.ModelAdmin):
    """A model with one row, edited in place: no add, no delete, the list goes straight to it."""

    def singleton(self) -> Model:
        raise NotImplementedError

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> HttpResponse:
        opts = self.model._meta
        url = reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[self.singleton().pk])
        return HttpResponseRedirect(url)


class LinkOnceChangeList(ChangeList):
    """The admin's change list, each row's link made from the change URL reversed once a page
    (``reverse`` a row was an eighth of a 100-event page's time: 3 of 24 ms in-process)."""

    @cached_property
    def _change_url(self) -> tuple[str, str]:
        """The change URL around where an object's key goes."""
        url = reverse(
            f"admin:{self.opts.app_label}_{self.opts.model_name}_change",
            args=("0",),
            current_app=self.model_admin.admin_site.name,
        )
        head, tail = url.rsplit("/0/", 1)
        return head, tail

    def url_for_result(self, result: Any) -> str:
        head, tail = self._change_url
        return f"{head}/{quote(getattr(result, self.pk_attname))}/{tail}"


class ReadOnlyAdmin(admin.ModelAdmin):
    """Stored history is evidence: nobody edits, adds or deletes it by hand (it leaves only by
    retention). Its lists are long: each row's link is made without a ``reverse``."""

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return LinkOnceChangeList

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class MlxserveAdminSite(admin.AdminSite):
    """The admin named after the product and the deployment (``MLXSERVE_SITE_NAME``, default
    this host's name), so a person with several open knows which fleet they are looking at."""

    def each_context(self, request: HttpRequest) -> dict[str, Any]:
        context = super().each_context(request)
        context["site_header"] = f"mlxserve · {settings.MLXSERVE_SITE_NAME}"
        context["site_title"] = f"mlxserve {settings.MLXSERVE_SITE_NAME}"
        return context

    index_title = "Fleet control plane"
    # The index opens on the fleet (a panel the events app draws: events/templates/admin/).
    index_template = "admin/fleet_index.html"


class MlxserveAdminConfig(AdminConfig):
    default_site = "mlxserve.web.admin.MlxserveAdminSite"
