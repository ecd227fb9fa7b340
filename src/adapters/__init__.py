"""The model side: transcoder-adapter checkpoints in the paper's format.

Import the submodules you need (``adapters.checkpoint``, ``adapters.branch``); this
package imports nothing heavy so that the CLI starts without torch.
"""
