"""Multi-turn, tool-using rollouts: environments (``env``), tools (``tools``, ``calculator``), observation turns
(``observations``), the token-in/token-out rollout (``rollout``) and the built-in calculator task (``task``)."""
