"""Named run configs, one JSON file each (load with :func:`metaopt.training.config.load_preset`).

A preset is a whole :class:`metaopt.training.config.RunConfig` (every option written out, so
nothing is left implicit), with the values its paper fixes. Adding a benchmark is a JSON file
here plus, for a new task family, a dataset builder registered in ``metaopt.datasets``. The
few-shot presets are listed below; the learned optimizers' are ``l2l-quadratics``, ``l2l-mnist``
(Andrychowicz et al. 2016), ``mlp-lopt-quadratics``, ``mlp-lopt-fashion-mnist8-50`` (with ``-es``
and ``-pes``: learned_optimization's ``LOpt_MLPLOpt_FahionMnist_50`` by each estimator) and
``rnn-mlp-lopt-suite-pes`` (Metz et al. 2020's hierarchical optimizer by PES on the task suite),
``li-malik-logistic``, ``li-malik-robust-linear`` and ``li-malik-two-layer-net`` (Li & Malik's
policy, by ES, on each of their problem families); the rule searches' are
``neural-optimizer-search-ppo`` and ``neural-optimizer-search-random`` (Bello et al. 2017's
controller and the random-search baseline with the same budget).

=========================  ================================================================
preset                     settings (source)
=========================  ================================================================
maml-sinusoid-5shot        MAML sinusoid, K = 5: MLP 40-40 ReLU, 1 inner step of lr 0.01,
                           Adam 1e-3, 25 tasks per meta-batch, 70000 iterations, 10 query
                           points (Finn et al. 2017, §5.1; cbfinn/maml ``main.py``)
maml-sinusoid-10shot       the same with K = 10
fomaml-sinusoid-10shot     first-order MAML (Finn et al. 2017, §5.2) on the K = 10 setting
maml-omniglot-5w1s         Conv4 64 filters, strided (MAML's Omniglot net), 1 inner step of
maml-omniglot-5w5s         lr 0.4 (3 at test), Adam 1e-3, meta-batch 32, 60000 iterations,
                           K query examples per class at training (Finn et al. 2017, §5.2, A.1)
maml-omniglot-20w1s        the same with 5 inner steps of lr 0.1 (5 at test), meta-batch 16
maml-omniglot-20w5s
maml-anil-omniglot-5w1s    ANIL (Raghu et al. 2020: the head adapts, the body is only meta-learned)
                           on maml-omniglot-5w1s's net and tasks, compiled strategy, Adam 1e-3
                           cosine-annealed to 1e-5 over 18000 iterations (about 20 minutes on 2
                           CPU cores); validation on 200 tasks every 1000 iterations
maml-miniimagenet-5w1s     Conv4 32 filters, max-pool, 84x84; 5 inner steps of lr 0.01 (10 at
maml-miniimagenet-5w5s     test), meta-batch 4 (1-shot) / 2 (5-shot), 15 query examples per
                           class, meta-gradient clipped to [-10, 10], 60000 iterations
=========================  ================================================================

The few-shot presets evaluate on 600 test tasks with 15 query examples per class
(``eval_query``; ``--eval-query 1`` or ``5`` gives the paper's K-query test protocol) and the
MAML split of Omniglot (1200 training characters x 4 rotations, 423 test characters).

Evaluation uses 600 held-out tasks drawn with a seed different from the training tasks'
(cbfinn/maml ``main.py``, ``NUM_TEST_POINTS``) and one inner step, the setting of the paper's
comparison; ``metaopt eval --steps 10`` gives the 10-step figure.
"""

__all__: list[str] = []
