"""The milter protocol (version 6, as libmilter and Postfix speak it), filter side, sans-I/O.

* `constants` -- command, reply, action and step codes (libmilter's names).
* `codec`     -- packet framing (`Decoder`), typed commands, reply encoding.
* `session`   -- `FilterSession`: negotiation, macros, message assembly, decision -> replies.

Written here rather than taken from a library; docs/milter.md says why (kilter.protocol and pymilter
were read and measured).
"""
