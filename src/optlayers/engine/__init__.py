"""The interior point engine shared by the QP and the cone layers: the loop (``loop.run``, with the
host's looks; ``device_loop.run``, a ``while_loop`` on the device for the compiled paths), the step
(``step.py``), the KKT factorisation (``kkt.py``) and the cone plug-ins (``cones/``)."""
