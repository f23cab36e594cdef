from django.urls import path, re_path

from serving import views

urlpatterns = [
    path("chat/completions", views.chat_completions, name="openai-chat-completions"),
    path("completions", views.completions, name="openai-completions"),
    path("models", views.models_list, name="openai-models"),
    path("models/<path:model_id>", views.model_detail, name="openai-model"),
    re_path(r"^.*$", views.not_found),
]
