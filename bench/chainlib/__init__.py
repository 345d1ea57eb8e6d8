"""
The relay-chain benchmark harness behind ``bench/chain`` (issue 7).

It starts, on 127.0.0.1 only, a fast upstream, the chains under test (a plain two-hop treq proxy, and the relay pair
B then A), drives them with Debian's ``wrk`` and ``bench/wrk/chain.lua``, and writes the product's comparison table,
a JSON file and a PNG chart. Every process it starts is killed when it ends, however it ends.
"""
