"""Code that runs beside the Bluesky RunEngine, not in the service: plan stubs that steer an
experiment (`stubs`) from the live fit results a follower reads (`feedback`: the service's
0MQ results stream or its REST API)."""
