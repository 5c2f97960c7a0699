"""``python -m mmot.sspc``: the ``mmot-sspc`` CLI (so that ``torchrun ... -m mmot.sspc train`` runs it)."""

from mmot.sspc.cli import main

raise SystemExit(main())
