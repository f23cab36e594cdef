from django.urls import path

from events import views

urlpatterns = [
    path("events/", views.EventListCreateView.as_view(), name="event-list"),
    path("events/export/", views.EventExportView.as_view(), name="event-export"),
    path("events/<uuid:pk>/", views.EventDetailView.as_view(), name="event-detail"),
    path("generations/", views.GenerationCreateView.as_view(), name="generation-create"),
    path("generations/<uuid:generation_id>/", views.GenerationDetailView.as_view(), name="generation-detail"),
    path("stats/", views.StatsView.as_view(), name="stats"),
    path("workers/", views.WorkerListView.as_view(), name="worker-list"),
    path("dead-letters/", views.DeadLetterListView.as_view(), name="dead-letter-list"),
    path("dead-letters/<int:pk>/replay/", views.DeadLetterReplayView.as_view(), name="dead-letter-replay"),
    path("workers/unload/", views.WorkerUnloadView.as_view(), name="worker-unload"),
]
