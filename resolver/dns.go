package resolver

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/miekg/dns"
)

const (
	// ednsUDPSize is the EDNS0 UDP payload size we advertise (RFC 6891),
	// the DNS Flag Day 2020 value that avoids IP fragmentation.
	ednsUDPSize = 1232
	// maxUDPReply is the read buffer for a UDP reply: a server that
	// ignores ednsUDPSize still gets its whole datagram read and parsed.
	maxUDPReply = dns.MaxMsgSize
	// maxCNAMESteps bounds a CNAME chain, counted over all queries of
	// one lookup; a longer chain is ErrDNS.
	maxCNAMESteps = 8
	// defaultQueryTimeout replaces a non-positive NewDNS timeout.
	defaultQueryTimeout = 2 * time.Second
	// maxErrNameLen bounds a DNS name quoted in an error: names reached
	// through a CNAME are remote-controlled (SPEC 8.3).
	maxErrNameLen = 100
)

// udpReadBufs holds the maxUDPReply-byte buffers that UDP replies are read
// into, so that a query does not allocate 64 KiB for a reply that is
// usually smaller than ednsUDPSize.
var udpReadBufs = sync.Pool{New: func() any {
	buf := make([]byte, maxUDPReply)
	return &buf
}}

// DNS sends queries to the configured recursive nameservers with
// github.com/miekg/dns, never through Go's default resolver, so that
// discovery sees the AD bit of a validating resolver (SPEC 7.5) and uses the
// resolver the operator configured (SPEC 3.1, 4.1).
//
// A DNS is safe for concurrent use.
type DNS struct {
	servers []string
	timeout time.Duration
}

// NewDNS returns a DNS that queries servers ("host:port", IPv6 as
// "[::1]:53") in order. timeout bounds one query attempt to one server (a
// UDP query, or its TCP retry after a truncated answer); a non-positive
// timeout means 2 s. With no servers every lookup fails with ErrDNS.
func NewDNS(servers []string, timeout time.Duration) *DNS {
	if timeout <= 0 {
		timeout = defaultQueryTimeout
	}
	return &DNS{servers: append([]string(nil), servers...), timeout: timeout}
}

// ServersFromResolvConf reads the nameserver lines of a resolv.conf(5) file
// (usually /etc/resolv.conf) and returns their addresses as host:port with
// port 53, in file order (SPEC 3.1: the default resolver). Comment lines
// (starting with "#" or ";") and unparsable addresses are skipped, as the
// C library does. A file without any nameserver is an error.
func ServersFromResolvConf(path string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("resolver: reading resolv.conf: %w", err)
	}
	defer f.Close()
	var servers []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' || line[0] == ';' {
			continue
		}
		fields := strings.Fields(line)
		if len(fields) < 2 || fields[0] != "nameserver" {
			continue
		}
		// netip.ParseAddr also keeps an IPv6 zone ("fe80::1%eth0").
		addr, err := netip.ParseAddr(fields[1])
		if err != nil {
			continue
		}
		servers = append(servers, netip.AddrPortFrom(addr, 53).String())
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("resolver: reading %s: %w", path, err)
	}
	if len(servers) == 0 {
		return nil, fmt.Errorf("resolver: no nameserver in %s", path)
	}
	return servers, nil
}

// LookupTXT returns the TXT RRs at name (an A-label domain without the
// trailing dot), each RR's strings concatenated without separators (SPEC
// 3.1), following CNAMEs (RFC 8461 §3.1). NXDOMAIN or NODATA is an error
// wrapping ErrNoRecord, returned with the Answer of the denial (Authentic:
// the denial was DNSSEC-validated). Any failure to get an answer wraps
// ErrDNS: SERVFAIL, REFUSED, timeout, network error, a malformed or
// mismatched reply, a CNAME loop or a chain longer than 8.
func (d *DNS) LookupTXT(ctx context.Context, name string) ([]string, Answer, error) {
	rrs, ans, err := d.lookup(ctx, name, dns.TypeTXT)
	if err != nil {
		return nil, ans, err
	}
	return txtStrings(rrs), ans, nil
}

// txtStrings returns the data of TXT RRs (as lookup returns them for
// dns.TypeTXT), each RR's strings joined (SPEC 3.1).
func txtStrings(rrs []dns.RR) []string {
	txts := make([]string, 0, len(rrs))
	for _, rr := range rrs {
		txts = append(txts, joinTXT(rr.(*dns.TXT).Txt))
	}
	return txts
}

// LookupHost returns the A and AAAA addresses of host, IPv4 first (SPEC
// 4.1: the policy host is resolved through the configured resolver). The
// two lookups run concurrently and follow CNAMEs. Addresses from one lookup
// are returned even when the other failed. Without any address: ErrNoRecord
// when both lookups found no record, else the ErrDNS of a failed lookup (a
// failure says nothing about whether an address exists).
func (d *DNS) LookupHost(ctx context.Context, host string) ([]netip.Addr, error) {
	var v4, v6 []netip.Addr
	var err4, err6 error
	var wg sync.WaitGroup
	wg.Go(func() { v4, err4 = d.LookupFamily(ctx, host, false) })
	wg.Go(func() { v6, err6 = d.LookupFamily(ctx, host, true) })
	wg.Wait()
	return joinFamilies(host, v4, err4, v6, err6)
}

// LookupFamily returns the IPv4 (A) or, with ipv6, the IPv6 (AAAA)
// addresses of host, following CNAMEs: LookupHost's lookups one at a time,
// for a caller that can use the first answer before the second comes (the
// policy fetch connects to IPv4 addresses without waiting for AAAA).
func (d *DNS) LookupFamily(ctx context.Context, host string, ipv6 bool) ([]netip.Addr, error) {
	qtype := dns.TypeA
	if ipv6 {
		qtype = dns.TypeAAAA
	}
	rrs, _, err := d.lookup(ctx, host, qtype)
	addrs := make([]netip.Addr, 0, len(rrs))
	for _, rr := range rrs {
		var ip []byte
		if ipv6 {
			ip = rr.(*dns.AAAA).AAAA.To16()
		} else {
			ip = rr.(*dns.A).A.To4()
		}
		if a, ok := netip.AddrFromSlice(ip); ok {
			addrs = append(addrs, a)
		}
	}
	return addrs, err
}

// joinFamilies is LookupHost's answer from the two lookups of host: v4
// and err4 from A, v6 and err6 from AAAA.
func joinFamilies(host string, v4 []netip.Addr, err4 error, v6 []netip.Addr, err6 error) ([]netip.Addr, error) {
	switch {
	case len(v4)+len(v6) > 0:
		return append(v4[:len(v4):len(v4)], v6...), nil
	case err4 != nil && !errors.Is(err4, ErrNoRecord):
		return nil, err4
	case err6 != nil && !errors.Is(err6, ErrNoRecord):
		return nil, err6
	}
	return nil, fmt.Errorf("%w: %s: no A or AAAA record", ErrNoRecord, clipName(host))
}

// errNoData marks the ErrNoRecord of a NODATA answer (the name exists
// without records of the type), for callers that tell it from NXDOMAIN.
var errNoData = errors.New("NODATA")

// lookup resolves name and qtype to the RRs of type qtype at the end of the
// name's CNAME chain (RFC 8461 §3.1: senders MUST follow CNAMEs), querying
// the chain's last name until a reply ends it (lookupChain.follow).
func (d *DNS) lookup(ctx context.Context, name string, qtype uint16) ([]dns.RR, Answer, error) {
	c, err := newLookupChain(name, qtype)
	if err != nil {
		return nil, Answer{}, err
	}
	for {
		reply, err := d.query(ctx, c.cur(), qtype)
		if err != nil {
			return nil, Answer{}, err
		}
		rrs, ans, more, err := c.follow(reply)
		if !more {
			return rrs, ans, err
		}
	}
}

// lookupChain is one lookup's state across its queries: the CNAME chain
// followed so far and what the replies said of TTL and DNSSEC. It does no
// I/O, so that the handling of hostile replies can be fuzzed
// (FuzzDNSReply).
type lookupChain struct {
	name  string // as asked, for errors
	qtype uint16
	// chain is the query name, then each CNAME target followed, over all
	// queries of the lookup (maxCNAMESteps bounds it).
	chain []string
	// authentic holds while every reply had the AD bit.
	authentic bool
	// ttl is the smallest TTL seen so far.
	ttl uint32
}

// newLookupChain starts the lookup of name and qtype, or fails with ErrDNS
// for a name that is not a valid DNS name.
func newLookupChain(name string, qtype uint16) (*lookupChain, error) {
	qname := dns.Fqdn(name)
	if _, ok := dns.IsDomainName(qname); !ok || qname == "." {
		return nil, fmt.Errorf("%w: %s %s: invalid name", ErrDNS, clipName(name), dns.Type(qtype))
	}
	return &lookupChain{name: name, qtype: qtype, chain: []string{qname}, authentic: true, ttl: ^uint32(0)}, nil
}

// cur is the name to query next: the last name of the chain.
func (c *lookupChain) cur() string { return c.chain[len(c.chain)-1] }

// follow applies reply, a final answer (NOERROR or NXDOMAIN, see
// finalRcode) that matched a query for c.cur() (checkReply). The recursive
// resolver normally returns the chain and its target's records in one
// answer; only records whose owner is on the chain are used, so records for
// any other name (a defence against answers for the wrong name) are
// ignored. It returns the RRs of type qtype at the end of the chain; or an
// error wrapping ErrNoRecord (NXDOMAIN, NODATA) or ErrDNS (a CNAME loop, a
// chain longer than maxCNAMESteps, several CNAMEs at one name); or more =
// true when the chain ends in a CNAME whose target has no data in the
// reply, which the caller then queries (c.cur() is the target).
//
// The Answer's TTL is the smallest TTL of the CNAMEs on the chain and of
// the RRset returned; for NXDOMAIN and NODATA, of the CNAMEs and the
// denial's negative TTL (RFC 2308 §5), or 0 when the reply has no SOA to
// take it from.
func (c *lookupChain) follow(reply *dns.Msg) (rrs []dns.RR, ans Answer, more bool, err error) {
	queried := c.cur()
	// Answer.Authentic holds only if every reply that gave part of the
	// chain or the data had the AD bit (RFC 4035 §3.2.3).
	c.authentic = c.authentic && reply.AuthenticatedData
	if reply.Rcode == dns.RcodeNameError {
		// SPEC 3.4: NXDOMAIN, of the name or of a CNAME target.
		ans := Answer{Authentic: c.authentic, TTL: ttlDuration(min(c.ttl, negativeTTL(reply)))}
		return nil, ans, false, fmt.Errorf("%w: %s %s: NXDOMAIN", ErrNoRecord, clipName(queried), dns.Type(c.qtype))
	}
	for {
		cur := c.cur()
		if rrs := answerRRs(reply.Answer, cur, c.qtype); len(rrs) > 0 {
			for _, rr := range rrs {
				c.ttl = min(c.ttl, rrTTL(rr.Header().Ttl))
			}
			return rrs, Answer{Authentic: c.authentic, TTL: ttlDuration(c.ttl)}, false, nil
		}
		target, cnameTTL, err := answerCNAME(reply.Answer, cur)
		if err != nil {
			return nil, Answer{}, false, fmt.Errorf("%w: %s %s: %v", ErrDNS, clipName(cur), dns.Type(c.qtype), err)
		}
		if target == "" {
			break
		}
		if len(c.chain) > maxCNAMESteps {
			return nil, Answer{}, false, fmt.Errorf("%w: %s %s: CNAME chain longer than %d", ErrDNS, clipName(c.name), dns.Type(c.qtype), maxCNAMESteps)
		}
		for _, seen := range c.chain {
			if strings.EqualFold(seen, target) {
				return nil, Answer{}, false, fmt.Errorf("%w: %s %s: CNAME loop at %s", ErrDNS, clipName(c.name), dns.Type(c.qtype), clipName(target))
			}
		}
		c.chain = append(c.chain, target)
		c.ttl = min(c.ttl, cnameTTL)
	}
	if cur := c.cur(); strings.EqualFold(cur, queried) {
		// SPEC 3.4: NODATA, of the name or of a CNAME target.
		ans := Answer{Authentic: c.authentic, TTL: ttlDuration(min(c.ttl, negativeTTL(reply)))}
		return nil, ans, false, fmt.Errorf("%w: %s %s: %w", ErrNoRecord, clipName(cur), dns.Type(c.qtype), errNoData)
	}
	// The chain ends in a CNAME whose target has no data here: ask for
	// the target.
	return nil, Answer{}, true, nil
}

// answerRRs returns the RRs of type qtype and class IN owned by owner. RRs
// of other types (RRSIGs, since queries set DO) and other owners are
// ignored.
func answerRRs(answer []dns.RR, owner string, qtype uint16) []dns.RR {
	var rrs []dns.RR
	for _, rr := range answer {
		h := rr.Header()
		if h.Rrtype == qtype && h.Class == dns.ClassINET && strings.EqualFold(h.Name, owner) {
			rrs = append(rrs, rr)
		}
	}
	return rrs
}

// answerCNAME returns the target of the CNAME owned by owner and its TTL, or
// "" when there is none. Two CNAMEs with different targets at one owner
// (RFC 2181 §10.1 allows one) are an error.
func answerCNAME(answer []dns.RR, owner string) (string, uint32, error) {
	target := ""
	ttl := ^uint32(0)
	for _, rr := range answer {
		cname, ok := rr.(*dns.CNAME)
		if !ok || cname.Hdr.Class != dns.ClassINET || !strings.EqualFold(cname.Hdr.Name, owner) {
			continue
		}
		if target != "" && !strings.EqualFold(target, cname.Target) {
			return "", 0, errors.New("several CNAMEs for one name")
		}
		target = cname.Target
		ttl = min(ttl, rrTTL(cname.Hdr.Ttl))
	}
	return target, ttl, nil
}

// negativeTTL is how long a denial may be cached (RFC 2308 §5): the smaller
// of the TTL and the MINIMUM field of the SOA in the authority section, or
// 0 when there is no SOA.
func negativeTTL(reply *dns.Msg) uint32 {
	for _, rr := range reply.Ns {
		if soa, ok := rr.(*dns.SOA); ok && soa.Hdr.Class == dns.ClassINET {
			return min(rrTTL(soa.Hdr.Ttl), rrTTL(soa.Minttl))
		}
	}
	return 0
}

// rrTTL is a TTL as received, with RFC 2181 §8 applied: a value with the
// top bit set is treated as 0.
func rrTTL(ttl uint32) uint32 {
	if ttl > 1<<31-1 {
		return 0
	}
	return ttl
}

// ttlDuration converts a TTL in seconds.
func ttlDuration(ttl uint32) time.Duration { return time.Duration(ttl) * time.Second }

// query sends one question to the servers in order until one gives a final
// answer: NOERROR or NXDOMAIN. A timeout, network error, malformed or
// mismatched reply, SERVFAIL, REFUSED or any other rcode moves on to the
// next server; when all fail, the last server's error is returned.
func (d *DNS) query(ctx context.Context, qname string, qtype uint16) (*dns.Msg, error) {
	if len(d.servers) == 0 {
		return nil, fmt.Errorf("%w: %s %s: no nameserver configured", ErrDNS, clipName(qname), dns.Type(qtype))
	}
	var lastErr error
	for _, server := range d.servers {
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("%w: %s %s: %w", ErrDNS, clipName(qname), dns.Type(qtype), err)
		}
		reply, err := d.exchange(ctx, server, qname, qtype)
		if err == nil {
			if finalRcode(reply.Rcode) {
				return reply, nil
			}
			err = fmt.Errorf("%w: %s %s: %s from %s", ErrDNS, clipName(qname), dns.Type(qtype), rcodeName(reply.Rcode), server)
		} else if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
			// Only the caller's ctx ending wraps these: stop here.
			return nil, err
		}
		lastErr = err
	}
	return nil, lastErr
}

// exchange asks one server over UDP and, when the reply is truncated,
// again over TCP (RFC 7766 §5).
func (d *DNS) exchange(ctx context.Context, server, qname string, qtype uint16) (*dns.Msg, error) {
	reply, err := d.exchangeOnce(ctx, "udp", server, qname, qtype)
	if err != nil || !reply.Truncated {
		return reply, err
	}
	reply, err = d.exchangeOnce(ctx, "tcp", server, qname, qtype)
	if err != nil {
		return nil, err
	}
	if reply.Truncated {
		return nil, fmt.Errorf("%w: %s %s: truncated reply over TCP from %s", ErrDNS, clipName(qname), dns.Type(qtype), server)
	}
	return reply, nil
}

// exchangeOnce sends one query with a fresh random ID over network ("udp"
// or "tcp") and reads the reply, within d.timeout and ctx. The query asks
// for recursion (RD) and DNSSEC data (EDNS0 DO), so that a validating
// resolver reports validation in the AD bit; CD stays clear so that the
// resolver validates.
func (d *DNS) exchangeOnce(ctx context.Context, network, server, qname string, qtype uint16) (*dns.Msg, error) {
	fail := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s %s: "+format, append([]any{ErrDNS, clipName(qname), dns.Type(qtype)}, args...)...)
	}

	query := new(dns.Msg)
	query.SetQuestion(qname, qtype) // RD set, random ID (RFC 5452 §9.2)
	query.SetEdns0(ednsUDPSize, true)
	wire, err := query.Pack()
	if err != nil {
		return nil, fail("packing query: %v", err)
	}

	actx, cancel := context.WithTimeout(ctx, d.timeout)
	defer cancel()
	var dialer net.Dialer
	conn, err := dialer.DialContext(actx, network, server)
	if err != nil {
		return nil, d.ioError(ctx, fail, network, server, err)
	}
	defer conn.Close()
	deadline, _ := actx.Deadline()
	if err := conn.SetDeadline(deadline); err != nil {
		return nil, d.ioError(ctx, fail, network, server, err)
	}
	// Cancelling ctx (not only its deadline) ends a blocked read.
	stop := context.AfterFunc(actx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	var raw []byte
	if network == "udp" {
		if _, err := conn.Write(wire); err != nil {
			return nil, d.ioError(ctx, fail, network, server, err)
		}
		bufp := udpReadBufs.Get().(*[]byte)
		defer udpReadBufs.Put(bufp)
		buf := *bufp
		for {
			n, err := conn.Read(buf)
			if err != nil {
				return nil, d.ioError(ctx, fail, network, server, err)
			}
			// A datagram with another ID is not our reply (RFC 5452
			// §9.1): drop it and keep waiting, so that spoofed or late
			// datagrams can neither answer nor fail the query.
			if n >= 2 && binary.BigEndian.Uint16(buf) == query.Id {
				// A copy of the datagram's size, so that nothing
				// unpacked from it can share the pooled buffer.
				raw = bytes.Clone(buf[:n])
				break
			}
		}
	} else {
		framed := make([]byte, 2+len(wire))
		binary.BigEndian.PutUint16(framed, uint16(len(wire)))
		copy(framed[2:], wire)
		if _, err := conn.Write(framed); err != nil {
			return nil, d.ioError(ctx, fail, network, server, err)
		}
		var length [2]byte
		if _, err := io.ReadFull(conn, length[:]); err != nil {
			return nil, d.ioError(ctx, fail, network, server, err)
		}
		raw = make([]byte, binary.BigEndian.Uint16(length[:]))
		if _, err := io.ReadFull(conn, raw); err != nil {
			return nil, d.ioError(ctx, fail, network, server, err)
		}
	}

	reply, reason := checkReply(query, raw)
	if reason != "" {
		return nil, fail("%s over %s from %s", reason, network, server)
	}
	return reply, nil
}

// finalRcode reports whether rcode ends a query: NOERROR or NXDOMAIN. Any
// other rcode (SERVFAIL, REFUSED, ...) moves on to the next server.
func finalRcode(rcode int) bool {
	return rcode == dns.RcodeSuccess || rcode == dns.RcodeNameError
}

// checkReply unpacks raw, the reply read for query, and checks that it
// answers query (replyMismatch). It returns the reply, or a short fixed
// reason why it is not one (never text from raw, SPEC 8.3).
func checkReply(query *dns.Msg, raw []byte) (*dns.Msg, string) {
	reply := new(dns.Msg)
	if err := reply.Unpack(raw); err != nil {
		return nil, "malformed reply"
	}
	if reason := replyMismatch(query, reply); reason != "" {
		return nil, reason
	}
	return reply, ""
}

// replyMismatch reports why reply does not answer query, or "" when it does:
// the ID, the QR bit, the opcode and, for the final rcodes, the question
// (name case-insensitively, type, class). Servers may leave out the
// question of an error reply, which is a failure anyway.
func replyMismatch(query, reply *dns.Msg) string {
	switch {
	case reply.Id != query.Id:
		return "reply with another ID"
	case !reply.Response:
		return "reply without the QR bit"
	case reply.Opcode != dns.OpcodeQuery:
		return "reply with another opcode"
	case !finalRcode(reply.Rcode):
		return ""
	}
	q := query.Question[0]
	if len(reply.Question) != 1 {
		return "reply without the question"
	}
	rq := reply.Question[0]
	if !strings.EqualFold(rq.Name, q.Name) || rq.Qtype != q.Qtype || rq.Qclass != q.Qclass {
		return "reply for another question"
	}
	return ""
}

// ioError describes a failed dial, read or write: a timeout, the caller's
// ctx ending (wrapped, so that errors.Is finds context.Canceled or
// context.DeadlineExceeded), or a network error.
func (d *DNS) ioError(ctx context.Context, fail func(string, ...any) error, network, server string, err error) error {
	if cerr := ctx.Err(); cerr != nil {
		return fail("%w", cerr)
	}
	// The socket deadline may fire just before ctx's own timer does.
	if dl, ok := ctx.Deadline(); ok && !time.Now().Before(dl) {
		return fail("%w", context.DeadlineExceeded)
	}
	var nerr net.Error
	if errors.Is(err, os.ErrDeadlineExceeded) || errors.As(err, &nerr) && nerr.Timeout() || errors.Is(err, context.DeadlineExceeded) {
		return fail("timeout after %s over %s from %s", d.timeout, network, server)
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		// A bare "EOF" would not say which server closed the connection.
		return fail("connection closed over %s from %s", network, server)
	}
	return fail("%v", err)
}

// rcodeName is the mnemonic of rcode, such as "SERVFAIL".
func rcodeName(rcode int) string {
	if s, ok := dns.RcodeToString[rcode]; ok {
		return s
	}
	return "RCODE" + strconv.Itoa(rcode)
}

// clipName returns name without its trailing dot, cut to maxErrNameLen
// bytes: names in errors may come from CNAME targets (SPEC 8.3). DNS names
// from miekg/dns are in presentation format, printable ASCII.
func clipName(name string) string {
	name = strings.TrimSuffix(name, ".")
	if len(name) > maxErrNameLen {
		return name[:maxErrNameLen] + "..."
	}
	return name
}

// joinTXT concatenates the character-strings of one TXT RR without
// separators (SPEC 3.1, RFC 7208 §3.3 does the same for SPF). miekg/dns
// keeps them in presentation format, with `"` and `\` escaped as `\"` and
// `\\` and other bytes outside printable ASCII as `\DDD`; joinTXT undoes
// that, so the record parser sees the bytes that were published.
func joinTXT(parts []string) string {
	escaped := false
	for _, p := range parts {
		if strings.IndexByte(p, '\\') >= 0 {
			escaped = true
			break
		}
	}
	if !escaped {
		return strings.Join(parts, "")
	}
	var b strings.Builder
	for _, p := range parts {
		for i := 0; i < len(p); i++ {
			c := p[i]
			if c == '\\' && i+1 < len(p) {
				i++
				c = p[i]
				if i+2 < len(p) && dnsIsDigit(p[i]) && dnsIsDigit(p[i+1]) && dnsIsDigit(p[i+2]) {
					n := int(p[i]-'0')*100 + int(p[i+1]-'0')*10 + int(p[i+2]-'0')
					c = byte(n)
					i += 2
				}
			}
			b.WriteByte(c)
		}
	}
	return b.String()
}

func dnsIsDigit(c byte) bool { return '0' <= c && c <= '9' }
