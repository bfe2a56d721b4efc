"""flaxdiff's Flax NNX models, named and laid out as their diffusers/transformers counterparts.

``unet_2d`` (UNet2DModel), ``unet_2d_condition`` (Stable Diffusion's UNet), ``autoencoder_kl``
and ``clip_text``; their parts in ``layers``, ``attention``, ``resnet``, ``embeddings``,
``unet_blocks`` and ``cross_attention_blocks``. ``convert`` reads and writes diffusers folders
(through ``weights_io`` and ``state_dict``; old Flax msgpack files through ``flax_msgpack``);
``bench`` times a forward pass.
"""
