//! Models: configs, loaders, the decoder, and linear layers over 4-bit or dense bases.
