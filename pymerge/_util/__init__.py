"""Foundation helpers every layer may use (and that import nothing else of pymerge):
state-dict checks (:mod:`.checks`), progress bars (:mod:`.progress`), small LRU caches
(:mod:`.cache`), argument checks (:mod:`.args`)."""
