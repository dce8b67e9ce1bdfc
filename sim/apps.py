"""The repository as a Flower App: `flwr run .` loads `server_app` and `client_app` here.

Both read the fedstream config from Flower's run config; `fedstream sim` builds the same apps
with the config bound in (`sim_server_app(cfg)`, `sim_client_app(cfg)`).
"""

from fedstream.sim.client_app import sim_client_app
from fedstream.sim.server_app import sim_server_app

server_app = sim_server_app()
client_app = sim_client_app()
