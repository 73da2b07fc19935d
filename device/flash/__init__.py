"""Flash windowing at run time: the flash store, embedding rows read per token, layer streaming, neuron windowing."""
