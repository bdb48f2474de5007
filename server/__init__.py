"""sdflow server: the aiohttp application (ComfyUI-compatible HTTP/websocket API), its durable queue worker,
and the `sdflow` CLI."""
