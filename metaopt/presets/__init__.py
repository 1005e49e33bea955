"""Named experiment configs, one JSON file each (load with :func:`metaopt.config.load_preset`).

A preset holds the fields of :class:`metaopt.config.ExperimentConfig` that its paper fixes;
the others keep their defaults. Adding a benchmark is a JSON file here plus, for a new task
family, a dataset builder registered in ``metaopt.datasets``.

=========================  ================================================================
preset                     settings (source)
=========================  ================================================================
maml-sinusoid-5shot        MAML sinusoid, K = 5: MLP 40-40 ReLU, 1 inner step of lr 0.01,
                           Adam 1e-3, 25 tasks per meta-batch, 70000 iterations, 10 query
                           points (Finn et al. 2017, §5.1; cbfinn/maml ``main.py``)
maml-sinusoid-10shot       the same with K = 10
fomaml-sinusoid-10shot     first-order MAML (Finn et al. 2017, §5.2) on the K = 10 setting
=========================  ================================================================

Evaluation uses 600 held-out tasks drawn with a seed different from the training tasks'
(cbfinn/maml ``main.py``, ``NUM_TEST_POINTS``) and one inner step, the setting of the paper's
comparison; ``metaopt eval --steps 10`` gives the 10-step figure.
"""

__all__: list[str] = []
