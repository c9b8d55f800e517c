"""Settings for the django-q2 baseline cluster in bench/lateness.py.

Jobsite's settings with django-q2's own scheduler turned on, under a cluster
name of its own: its ORM queue is separate from Jobsite's cluster on the same
database, and it only handles schedules whose `cluster` names it.
"""

from jobsite.settings import *  # noqa: F403
from jobsite.settings import Q_CLUSTER

BASELINE_CLUSTER = "jobsite-baseline"

Q_CLUSTER = {**Q_CLUSTER, "cluster_name": BASELINE_CLUSTER, "scheduler": True}
