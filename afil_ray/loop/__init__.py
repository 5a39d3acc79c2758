"""The harvest-learn loop as plain classes (no Ray): rollout workers, the online learner, the evaluator and the
weight board. ``actors/`` and ``learners/`` wrap them as Ray actors; tests drive them directly."""
