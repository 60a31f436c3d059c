/* virtio-net header rules: what the negotiated features let the guest send,
 * and the check of every transmitted chain against them (header size, GSO
 * type, checksum offsets inside the frame, length against the MTU) before
 * the frame goes anywhere. Pure computation on the device's settings: no
 * I/O, no locks, so the rules can be read (and tested) on their own. */
#include "vu_net_internal.h"
#include "vu_iov.h"

#include <linux/virtio_config.h>
#include <linux/virtio_net.h>

void net_check_features(struct vu_net_dev *n, uint64_t f)
{
#define HAS(bit) (!!(f & (1ULL << (bit))))
    n->mrg_rxbuf = HAS(VIRTIO_NET_F_MRG_RXBUF);
    n->hdr_len = (HAS(VIRTIO_F_VERSION_1) || n->mrg_rxbuf) ? 12 : 10;
    n->host_csum = HAS(VIRTIO_NET_F_CSUM);
    n->host_tso4 = HAS(VIRTIO_NET_F_HOST_TSO4);
    n->host_tso6 = HAS(VIRTIO_NET_F_HOST_TSO6);
    n->host_ecn = HAS(VIRTIO_NET_F_HOST_ECN);
    n->host_ufo = HAS(VIRTIO_NET_F_HOST_UFO);
#undef HAS
}

int vu_net_check_tx(struct vu_net_dev *n, struct vu_elem *e, struct vu_net_hdr *hdr)
{
    memset(hdr, 0, sizeof(*hdr));
    if (e->out_len < n->hdr_len)
        return VU_NET_D_SHORT;
    if (VU_LIKELY(n->hdr_len == sizeof(*hdr) && e->iov[0].iov_len >= sizeof(*hdr)))
        memcpy(hdr, e->iov[0].iov_base, sizeof(*hdr));    /* fixed size: inlined */
    else if (!vu_iov_gather(e->iov, e->out_num, 0, hdr, n->hdr_len))
        return VU_NET_D_SHORT;
    uint64_t frame = e->out_len - n->hdr_len;
    if (frame < ETH_HLEN)
        return VU_NET_D_SHORT;
    uint8_t gso = hdr->gso_type & ~VIRTIO_NET_HDR_GSO_ECN;
    if ((hdr->gso_type & VIRTIO_NET_HDR_GSO_ECN) && !n->host_ecn)
        return VU_NET_D_BAD_GSO;
    switch (gso) {
    case VIRTIO_NET_HDR_GSO_NONE:
        if (frame > (uint64_t)n->mtu + ETH_HLEN + VLAN_HLEN)
            return VU_NET_D_TOO_LONG;
        break;
    case VIRTIO_NET_HDR_GSO_TCPV4:
        if (!n->host_tso4)
            return VU_NET_D_BAD_GSO;
        break;
    case VIRTIO_NET_HDR_GSO_TCPV6:
        if (!n->host_tso6)
            return VU_NET_D_BAD_GSO;
        break;
    case VIRTIO_NET_HDR_GSO_UDP:
        if (!n->host_ufo)
            return VU_NET_D_BAD_GSO;
        break;
    default:
        return VU_NET_D_BAD_GSO;
    }
    if (gso != VIRTIO_NET_HDR_GSO_NONE) {
        /* a GSO frame needs the checksum offload and a segment size */
        if (frame > VU_NET_MAX_FRAME || hdr->gso_size == 0 ||
            !(hdr->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM))
            return VU_NET_D_BAD_GSO;
    }
    if (hdr->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) {
        if (!n->host_csum)
            return VU_NET_D_BAD_CSUM;
        if ((uint32_t)hdr->csum_start + hdr->csum_offset + 2 > frame)
            return VU_NET_D_BAD_CSUM;
    }
    return 0;
}
