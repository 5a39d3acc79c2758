"""Evaluation: the paired protocol that compares sampler arms episode by episode.

- ``arms``: the arm language (``static:w=0.05``), parsed once into a typed :class:`~afil_ray.eval.arms.Arm`.
- ``episodes``: running one arm's episodes, with each episode's sampling noise fixed by (seed, run).
- ``workers``: where units of (task, arm, run) run: here, in processes, or through a runner (Ray, from the driver).
- ``protocol``: every arm on the same episodes, and the files (``afil-ray eval``).
- ``stats`` and ``report``: Wilson intervals, paired differences and McNemar tests; JSON, Markdown and plots.
- ``critic``: the success critic's held-out AUROCs, overall and within matched-state branch groups.
"""
