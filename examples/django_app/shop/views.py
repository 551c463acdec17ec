"""Views: writes go to the primary, reads to a replica that has this request's writes.

    POST /items/          name=...: create an item, read it back (the read-your-writes case)
    GET  /items/          the items (a replica)
    GET  /items/<id>/     one item (a replica; 404 if a replica does not have it yet: no
                          read-your-writes across requests)
    GET  /healthz         the router's view of the cluster; 503 without a primary
"""

from django.db import connections
from django.http import HttpRequest, HttpResponse, JsonResponse

from dbrouter.integrations.django import get_router

from .models import Item


def _served_by() -> dict[str, str]:
    node = connections["replica"].dbrouter_node
    return {"node": node.name, "role": node.role} if node is not None else {}


def items(request: HttpRequest) -> HttpResponse:
    if request.method == "POST":
        item = Item.objects.create(name=request.POST.get("name", "item"))  # the primary
        found = Item.objects.filter(pk=item.pk).values_list("name", flat=True).first()  # the replica alias
        return JsonResponse({"id": item.pk, "found": found is not None, **_served_by()}, status=201)
    names = list(Item.objects.order_by("-id").values_list("name", flat=True)[:100])
    return JsonResponse({"items": names, **_served_by()})


def item(request: HttpRequest, item_id: int) -> HttpResponse:
    found = Item.objects.filter(pk=item_id).values("id", "name", "stock").first()
    if found is None:
        return JsonResponse({"error": "not found", **_served_by()}, status=404)
    return JsonResponse({**found, **_served_by()})


def healthz(request: HttpRequest) -> HttpResponse:
    stats = get_router("default").stats()
    primary = stats["nodes"][stats["primary"]]
    ok = primary["healthy"] and primary["role"] == "primary"
    return JsonResponse({"primary": stats["primary"], "healthy": ok}, status=200 if ok else 503)
