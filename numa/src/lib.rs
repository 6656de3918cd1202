//! Host NUMA topology, vNUMA layout planning and pinning plans.
