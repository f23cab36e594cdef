from django.urls import path

from events import views

urlpatterns = [
    path("events/", views.EventListCreateView.as_view(), name="event-list"),
    path("events/<uuid:pk>/", views.EventDetailView.as_view(), name="event-detail"),
    path("generations/", views.GenerationCreateView.as_view(), name="generation-create"),
    path("generations/<uuid:generation_id>/", views.GenerationDetailView.as_view(), name="generation-detail"),
    path("workers/", views.WorkerListView.as_view(), name="worker-list"),
    path("workers/unload/", views.WorkerUnloadView.as_view(), name="worker-unload"),
]
