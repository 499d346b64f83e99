"""Azure OpenAI: a deployment URL, ``?api-version=`` on every request, the ``api-key`` header (or a
Microsoft Entra ID bearer token).

Requests go to ``https://RESOURCE.openai.azure.com/openai/deployments/NAME/chat/completions
?api-version=V``; the deployment, not the body's ``model``, picks the model. Health is the resource's
model list, ``GET /openai/models?api-version=V`` (a deployment has no ``/models`` of its own).
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlparse

from ferry.gateway.backends.base import Backend


class AzureBackend(Backend):
    def auth_headers(self, env: Mapping[str, str]) -> dict[str, str]:
        c = self.config
        if c.azure_ad_token_env:
            return {"Authorization": f"Bearer {env.get(c.azure_ad_token_env, '')}"}
        return {"api-key": env.get(c.api_key_env, "")} if c.api_key_env else {}

    def query_params(self) -> dict[str, str]:
        version = self.config.version
        assert version is not None  # NOTE: BackendConfig requires it for kind azure
        return {"api-version": version}

    def health_url(self) -> str:
        parsed = urlparse(self.config.base_url)
        return f"{parsed.scheme}://{parsed.netloc}/openai/models"
