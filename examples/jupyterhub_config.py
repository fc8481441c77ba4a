# pagedq's shared engine as a JupyterHub service: one engine for the kernels of every user.
#
#   jupyterhub -f jupyterhub_config.py       (with your authenticator and spawner settings added)
#
# The end-to-end test (tests/test_jupyterhub.py) runs this very file under a real JupyterHub with
# configurable-http-proxy, then adds its own authenticator, spawner and ports. Settings that
# depend on the deployment come from the environment, with defaults for a hub on one machine.
import os
import sys

# The hub's public URL (the proxy), as users' kernels reach it, and its base URL.
PUBLIC_URL = os.environ.get("PAGEDQ_HUB_PUBLIC_URL", "http://127.0.0.1:8000")
BASE_URL = os.environ.get("PAGEDQ_HUB_BASE_URL", "/")
# The model folder, and where the service listens (the proxy sends /services/pagedq/ there).
MODEL = os.environ.get("PAGEDQ_MODEL", "pagedq-tiny")
SERVICE_URL = os.environ.get("PAGEDQ_SERVICE_URL", "http://127.0.0.1:8765")
ENGINE_ARGS = os.environ.get("PAGEDQ_ENGINE_ARGS", "--dtype bfloat16").split()
# Who may use it: the members of this group.
USERS = [u for u in os.environ.get("PAGEDQ_USERS", "").split(",") if u]

c = get_config()  # noqa: F821 - JupyterHub's config loader defines get_config

c.JupyterHub.base_url = BASE_URL
c.JupyterHub.services = [
    {
        "name": "pagedq",
        "url": SERVICE_URL,
        # pagedq from the hub's own Python (the same as the `pagedq` command of its environment)
        "command": [sys.executable, "-m", "pagedq", "serve", MODEL, "--hub", *ENGINE_ARGS],
        "oauth_no_confirm": True,  # the page for people logs in without a consent screen
    }
]
# Access: a role with the service's access scope, for a group. Users outside it get 403.
c.JupyterHub.load_groups = {"pagedq-users": {"users": USERS}}
c.JupyterHub.load_roles = [
    {"name": "pagedq-users", "groups": ["pagedq-users"], "scopes": ["access:services!service=pagedq"]},
]
# A kernel calls with its server's token ($JUPYTERHUB_API_TOKEN): that token must carry the scope
# too (it gets the part of these scopes its user holds).
c.Spawner.server_token_scopes = [
    "users:activity!user",
    "access:servers!server",
    "access:services!service=pagedq",
]
# pagedq.connect() in a kernel finds the service here, through the hub's proxy.
c.Spawner.environment = {"PAGEDQ_URL": PUBLIC_URL.rstrip("/") + BASE_URL.rstrip("/") + "/services/pagedq/v1"}
