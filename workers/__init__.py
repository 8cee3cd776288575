"""Everything outside the training process: the ``trainbus`` command, dispatcher and workers."""
