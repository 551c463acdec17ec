from django.urls import path
from shop import views

urlpatterns = [
    path("items/", views.items),
    path("items/<int:item_id>/", views.item),
    path("healthz", views.healthz),
]
