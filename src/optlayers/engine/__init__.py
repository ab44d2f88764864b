"""The interior point engine shared by the QP and the cone layers (``loop.run``: the one loop)."""
