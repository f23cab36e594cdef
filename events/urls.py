from django.urls import path

from events import views

urlpatterns = [
    path("", views.EventListCreateView.as_view(), name="event-list"),
    path("<uuid:pk>/", views.EventDetailView.as_view(), name="event-detail"),
]
