/* The switch's address table: which port each station's MAC address was
 * last seen on, forgotten after max_age_ms. Set-associative: a new address
 * replaces the least recently seen entry of its set, so the table never
 * grows past SETS * WAYS whatever guests send, and the hash is seeded so
 * guests can't aim at one set. No locking of its own (the switch's lock
 * covers it). Static inline: learning and lookup run for every frame, and
 * only the forwarding code (vu_switch.c) uses the table. */
#ifndef VU_SWITCH_MAC_H
#define VU_SWITCH_MAC_H

#include "vu_switch.h"

#include <string.h>

#define ETH_ALEN 6

struct mac_entry {
    uint8_t mac[ETH_ALEN];
    uint16_t port;
    bool used;
    uint64_t seen_ms;
};

struct mac_table {
    struct mac_entry set[VU_SWITCH_MAC_SETS][VU_SWITCH_MAC_WAYS];
    uint64_t seed;              /* random */
    uint64_t max_age_ms;
};

/* Seeded hash of an address: its set, and a flow's spread over queues. */
static inline uint32_t mac_hash(const struct mac_table *t, const uint8_t *mac)
{
    uint64_t x = 0;
    memcpy(&x, mac, ETH_ALEN);
    x ^= t->seed;
    x *= 0x9E3779B97F4A7C15ull;
    x ^= x >> 29;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 32;
    return (uint32_t)x % VU_SWITCH_MAC_SETS;
}

static inline bool mac_fresh(const struct mac_table *t, const struct mac_entry *e, uint64_t now)
{
    return e->used && now - e->seen_ms < t->max_age_ms;
}

static inline void mac_learn(struct mac_table *t, const uint8_t *mac, int port, uint64_t now)
{
    struct mac_entry *set = t->set[mac_hash(t, mac)];
    struct mac_entry *victim = NULL;
    for (int w = 0; w < VU_SWITCH_MAC_WAYS; w++) {
        struct mac_entry *e = &set[w];
        if (e->used && memcmp(e->mac, mac, ETH_ALEN) == 0) {
            e->port = (uint16_t)port;       /* the address may have moved */
            e->seen_ms = now;
            return;
        }
        /* prefer an empty way, else the least recently seen */
        if (!victim || (victim->used && (!e->used || e->seen_ms < victim->seen_ms)))
            victim = e;
    }
    memcpy(victim->mac, mac, ETH_ALEN);
    victim->port = (uint16_t)port;
    victim->used = true;
    victim->seen_ms = now;
}

/* The port mac was learned on, or -1. */
static inline int mac_lookup(const struct mac_table *t, const uint8_t *mac, uint64_t now)
{
    const struct mac_entry *set = t->set[mac_hash(t, mac)];
    for (int w = 0; w < VU_SWITCH_MAC_WAYS; w++) {
        if (mac_fresh(t, &set[w], now) && memcmp(set[w].mac, mac, ETH_ALEN) == 0)
            return set[w].port;
    }
    return -1;
}

/* Every address learned on port. */
static inline void mac_forget_port(struct mac_table *t, int port)
{
    for (int s = 0; s < VU_SWITCH_MAC_SETS; s++)
        for (int w = 0; w < VU_SWITCH_MAC_WAYS; w++)
            if (t->set[s][w].port == port)
                t->set[s][w].used = false;
}

/* Addresses not yet aged out. */
static inline uint32_t mac_count(const struct mac_table *t, uint64_t now)
{
    uint32_t count = 0;
    for (int s = 0; s < VU_SWITCH_MAC_SETS; s++)
        for (int w = 0; w < VU_SWITCH_MAC_WAYS; w++)
            count += mac_fresh(t, &t->set[s][w], now);
    return count;
}

#endif
