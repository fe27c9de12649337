// Verifies the service's access tokens locally, with the key set from GetPublicKeys.
import type { Client } from "@connectrpc/connect";
import { createLocalJWKSet, decodeProtectedHeader, jwtVerify, type JSONWebKeySet } from "jose";

import type { UserService } from "./gen/users/v1/user_service_pb.js";

/** What a verified access token says: see GetPublicKeys in the contract. */
export interface AccessClaims {
  /** The user id. */
  subject: string;
  role: "user" | "admin";
  sessionId: string;
  /** The user's token version: opaque here, the server checks it. */
  version: number;
  id: string;
  issuedAt: Date;
  expiresAt: Date;
}

export class InvalidTokenError extends Error {
  override name = "InvalidTokenError";
}

/** How often, at most, an unknown kid makes the verifier fetch the key set again. */
export const REFETCH_INTERVAL_MS = 5_000;

/**
 * Fetches the key set once, caches it, and fetches it again when a token names a key id it does
 * not know (after a rotation), at most every REFETCH_INTERVAL_MS.
 *
 * A locally verified token stays valid until it expires even if the user's tokens were revoked
 * meanwhile (the server sees that through the `ver` claim; a local verifier cannot). Call
 * ValidateToken instead where that matters.
 */
export class TokenVerifier {
  private keys?: ReturnType<typeof createLocalJWKSet>;
  private kids = new Set<string>();
  private lastFetch = 0;

  constructor(
    private readonly client: Client<typeof UserService>,
    private readonly issuer: string,
    private readonly audience: string,
  ) {}

  async verify(token: string): Promise<AccessClaims> {
    let kid: unknown;
    try {
      kid = decodeProtectedHeader(token).kid;
    } catch {
      throw new InvalidTokenError("malformed access token");
    }
    if (typeof kid !== "string") {
      throw new InvalidTokenError("no kid");
    }
    if (!this.keys || (!this.kids.has(kid) && Date.now() - this.lastFetch >= REFETCH_INTERVAL_MS)) {
      await this.fetch();
    }
    let payload;
    try {
      ({ payload } = await jwtVerify(token, this.keys!, {
        algorithms: ["ES256"],
        typ: "at+jwt",
        issuer: this.issuer,
        audience: this.audience,
        requiredClaims: ["sub", "jti", "iat", "exp", "role", "sid", "ver"],
        clockTolerance: 5,
      }));
    } catch (error) {
      throw new InvalidTokenError(`invalid access token: ${(error as Error).message}`);
    }
    const { sub, jti, iat, exp, role, sid, ver } = payload;
    if (role !== "user" && role !== "admin") {
      throw new InvalidTokenError(`unknown role ${JSON.stringify(role)}`);
    }
    if (typeof sid !== "string" || !Number.isInteger(ver) || !sub || !jti) {
      throw new InvalidTokenError("a claim is missing or malformed");
    }
    return {
      subject: sub,
      role,
      sessionId: sid,
      version: ver as number,
      id: jti,
      issuedAt: new Date(iat! * 1000),
      expiresAt: new Date(exp! * 1000),
    };
  }

  private async fetch(): Promise<void> {
    this.lastFetch = Date.now();
    const reply = await this.client.getPublicKeys({});
    const set = JSON.parse(reply.jwksJson) as JSONWebKeySet;
    // Only the keys this service makes; anything else in the set is never trusted.
    const keys = set.keys.filter((k) => k.kty === "EC" && k.crv === "P-256" && k.alg === "ES256" && k.kid);
    this.keys = createLocalJWKSet({ keys });
    this.kids = new Set(keys.map((k) => k.kid!));
  }
}
